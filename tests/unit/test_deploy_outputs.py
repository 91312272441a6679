"""What the fleet shows: status table, progress line, controller metrics, Prometheus SD file,
and the server actor's pieces that need no socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pdserve.deploy.display import progress_line, status_table
from pdserve.deploy.handles import SLOT_NAME, ActorSlot, slot_name
from pdserve.deploy.metrics import FleetMetrics, sd_groups, write_sd_file
from pdserve.deploy.registry import Load
from pdserve.deploy.server_actor import _InFlight, import_factory
from pdserve.errors import ConfigError

pytestmark = pytest.mark.unit


def _status() -> dict[str, Any]:
    router = ActorSlot(name="f-router", role="router", state="healthy")
    router.info = {"url": "http://127.0.0.1:8000", "pid": 10, "incarnation": "a", "bootstrap_port": None}
    p = ActorSlot(name="f-prefill-0", role="prefill", state="healthy", registered_url="http://127.0.0.1:1")
    p.info = {"url": "http://127.0.0.1:1", "pid": 11, "incarnation": "b", "bootstrap_port": 9}
    p.load = Load(running=3, waiting=1, kv_usage=0.125, transport="shm")
    d = ActorSlot(name="f-decode-0", role="decode", state="failed", error="ConfigError: boom")
    return {
        "fleet": "f", "ready": False, "router": router.describe(),
        "workers": [p.describe(), d.describe()], "desired": {"prefill": 1, "decode": 2},
        "halted": {}, "controller": {"pid": 1, "metrics_port": 9999}, "events": [],
    }


def test_status_table() -> None:
    text = status_table(_status())
    lines = text.splitlines()
    assert lines[0] == "fleet f: NOT ready; desired 1 prefill, 2 decode; controller metrics on port 9999"
    assert lines[1].split() == ["NAME", "ROLE", "STATE", "URL", "PID", "RESTARTS", "RUNNING", "WAITING", "KV",
                                "TRANSPORT"]
    assert lines[3].split() == [
        "f-prefill-0", "prefill", "healthy", "http://127.0.0.1:1", "11", "0", "3", "1", "12.5%", "shm",
    ]
    assert lines[4].split()[:3] == ["f-decode-0", "decode", "failed"]
    assert text.endswith("errors:\n  f-decode-0: ConfigError: boom")


def test_progress_line() -> None:
    line = progress_line(_status(), 3.25)
    assert line == "[  3.2s] router healthy | prefill 1/1 | decode 0/2 (failed)"


def test_slot_names() -> None:
    assert slot_name("f", "router") == "f-router"
    m = SLOT_NAME.match(slot_name("my-fleet", "decode", 12))
    assert m is not None and (m["fleet"], m["role"], m["index"]) == ("my-fleet", "decode", "12")
    assert SLOT_NAME.match("my-fleet-router") is None


def test_fleet_metrics_names_and_states() -> None:
    registry = CollectorRegistry()
    m = FleetMetrics(registry)
    m.set_states({("decode", "healthy"): 2, ("prefill", "restarting"): 1})
    m.restarts.labels(role="decode").inc()
    m.drain.labels(role="decode").observe(0.3)
    text = generate_latest(registry).decode()
    assert 'pdserve:fleet_workers{role="decode",state="healthy"} 2.0' in text
    assert 'pdserve:fleet_workers{role="prefill",state="restarting"} 1.0' in text
    assert 'pdserve:fleet_workers{role="prefill",state="healthy"} 0.0' in text
    assert 'pdserve:fleet_worker_restarts_total{role="decode"} 1.0' in text
    assert 'pdserve:fleet_drain_seconds_count{role="decode"} 1.0' in text
    m.close()  # never served: nothing to stop


def test_sd_groups_and_atomic_file(tmp_path: Path) -> None:
    groups = sd_groups("f", [("decode", "http://127.0.0.1:2/"), ("decode", "http://127.0.0.1:1"),
                             ("router", "http://127.0.0.1:8000")])
    assert groups == [
        {"targets": ["127.0.0.1:1", "127.0.0.1:2"], "labels": {"role": "decode", "fleet": "f"}},
        {"targets": ["127.0.0.1:8000"], "labels": {"role": "router", "fleet": "f"}},
    ]
    path = tmp_path / "sd" / "targets.json"
    write_sd_file(path, groups)
    write_sd_file(path, groups[:1])
    assert json.loads(path.read_text()) == groups[:1]
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]  # no temp files left


async def test_in_flight_counts_work_not_probes() -> None:
    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(wrapped.count)

    wrapped = _InFlight(app)
    await wrapped({"type": "http", "path": "/v1/completions"}, None, None)
    await wrapped({"type": "http", "path": "/health"}, None, None)
    await wrapped({"type": "lifespan"}, None, None)
    assert seen == [1, 0, 0] and wrapped.count == 0

    async def boom(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("x")

    failing = _InFlight(boom)
    with pytest.raises(RuntimeError):
        await failing({"type": "http", "path": "/generate"}, None, None)
    assert failing.count == 0


def test_import_factory() -> None:
    assert import_factory("pdserve.deploy.standin:build_worker_app").__name__ == "build_worker_app"
    with pytest.raises(ConfigError, match=r"cannot import 'pdserve.nope'"):
        import_factory("pdserve.nope:f")
    with pytest.raises(ConfigError, match=r"has no callable 'nope'"):
        import_factory("pdserve.deploy.standin:nope")
