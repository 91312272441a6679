"""The fleet's mechanics on a local Ray cluster, with stand-in apps (no model): ``pdserve up
--address``, completions with the stock openai client, ``scale`` up and down under load with no
failed request (the stand-in router never retries), a SIGKILLed worker actor restarting and
serving again, ``pdserve down`` leaving no fleet process behind. Tests run in file order on one
fleet."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fleet_e2e import PdserveCli, assert_loopback_only, free_port, standin_yaml, wait_for

from pdserve.deploy.ray_cluster import LocalRayHead

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NAME = "e2e"


@pytest.fixture(scope="module")
def fleet(
    ray_cluster: LocalRayHead, pdserve_cli: PdserveCli, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    port = free_port("127.0.0.1")
    # 0.2 s per request: every worker has requests in flight when scale removes it
    path = tmp_path_factory.mktemp("cfg") / "fleet.yaml"
    config = standin_yaml(path, router_port=port, name=NAME, delay_s=0.2)
    proc = pdserve_cli(
        "up", "--config", str(config), "--address", ray_cluster.address, "--detach", timeout=300
    )
    url = proc.stdout.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{port}", proc.stdout
    info = {"url": url, "config": config, "down": False}
    try:
        yield info
    finally:
        if not info["down"]:
            pdserve_cli("down", "--name", NAME, "--no-drain", check=False, timeout=300)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30.0)


def _by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in status["workers"]}


def test_up_reports_a_ready_fleet_on_loopback(
    fleet: dict[str, Any], pdserve_cli: PdserveCli, ray_cluster: LocalRayHead
) -> None:
    status = pdserve_cli.status("--name", NAME)
    assert status["ready"]
    assert status["router"]["state"] == "healthy" and status["router"]["url"] == fleet["url"]
    roles = sorted((w["role"], w["state"], w["registered"]) for w in status["workers"])
    assert roles == [("decode", "healthy", True), ("prefill", "healthy", True)]
    prefill = next(w for w in status["workers"] if w["role"] == "prefill")
    assert prefill["bootstrap_port"] and prefill["load"]["transport"] == "fake"
    table = pdserve_cli("status", "--name", NAME).stdout
    assert "e2e-prefill-0" in table and "e2e-router" in table and "ready" in table
    registered = httpx.get(f"{fleet['url']}/workers", timeout=5).json()["workers"]
    assert sorted(w["url"] for w in registered) == sorted(w["url"] for w in status["workers"])
    assert_loopback_only(ray_cluster.pid)


def test_completions_with_the_openai_client(fleet: dict[str, Any]) -> None:
    client = _client(fleet["url"])
    assert [m.id for m in client.models.list().data] == ["standin"]
    out = client.completions.create(model="standin", prompt="hello", max_tokens=4)
    assert out.choices[0].text.startswith(" decode:") and out.usage is not None


class _Load:
    """Closed-loop traffic from a few threads until stopped; counts successes and failures."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.client = _client(url)
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.completions.create(model="standin", prompt="x" * 32, max_tokens=4)
                with self._lock:
                    self.ok += 1
            except Exception as exc:
                with self._lock:
                    self.errors.append(repr(exc)[:300])

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
            assert not t.is_alive()


def test_scale_up_and_down_under_load_loses_nothing(fleet: dict[str, Any], pdserve_cli: PdserveCli) -> None:
    with _Load(fleet["url"]) as load:
        time.sleep(1.0)
        pdserve_cli("scale", "--name", NAME, "--prefill", "2", "--decode", "3", timeout=300)
        grown = pdserve_cli.status("--name", NAME)
        served_during_growth = load.ok
        time.sleep(1.5)
        pdserve_cli("scale", "--name", NAME, "--prefill", "1", "--decode", "1", timeout=300)
        time.sleep(1.0)
    assert load.errors == []
    assert load.ok > served_during_growth > 0
    assert grown["ready"] and sorted(w["role"] for w in grown["workers"]).count("decode") == 3
    shrunk = pdserve_cli.status("--name", NAME)
    assert shrunk["ready"] and len(shrunk["workers"]) == 2
    # the newest were removed and the router forgot them
    assert sorted(_by_name(shrunk)) == ["e2e-decode-0", "e2e-prefill-0"]
    registered = httpx.get(f"{fleet['url']}/workers", timeout=5).json()["workers"]
    assert sorted(w["url"] for w in registered) == sorted(w["url"] for w in shrunk["workers"])
    drained = [e for e in shrunk["events"] if " removed after draining " in e]
    assert len(drained) == 3, shrunk["events"]


def test_killed_worker_actor_restarts_and_serves(fleet: dict[str, Any], pdserve_cli: PdserveCli) -> None:
    before = _by_name(pdserve_cli.status("--name", NAME))["e2e-decode-0"]
    os.kill(before["pid"], signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        w = _by_name(pdserve_cli.status("--name", NAME)).get("e2e-decode-0")
        ok = w and w["restarts"] >= 1 and w["state"] == "healthy" and w["registered"]
        return w if ok else None

    after = wait_for(restarted, timeout_s=120, what="the killed decode worker to restart")
    assert after["pid"] != before["pid"] and after["incarnation"] != before["incarnation"]
    registered = {w["url"] for w in httpx.get(f"{fleet['url']}/workers", timeout=5).json()["workers"]}
    assert after["url"] in registered and (before["url"] == after["url"] or before["url"] not in registered)
    client = _client(fleet["url"])
    texts = [client.completions.create(model="standin", prompt="hi", max_tokens=2).choices[0].text
             for _ in range(3)]
    assert all(t.startswith(f" decode:{after['url'].rsplit(':', 1)[1]}") for t in texts)


def test_down_leaves_no_fleet_process(
    fleet: dict[str, Any], pdserve_cli: PdserveCli, ray_cluster: LocalRayHead
) -> None:
    status = pdserve_cli.status("--name", NAME)
    pids = [status["router"]["pid"], status["controller"]["pid"], *(w["pid"] for w in status["workers"])]
    pdserve_cli("down", "--name", NAME, timeout=300)
    fleet["down"] = True

    def gone() -> bool:
        return not [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]

    wait_for(gone, timeout_s=30, what=f"fleet processes {pids} to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{fleet['url']}/health", timeout=2)
    proc = pdserve_cli("status", "--name", NAME, "--address", ray_cluster.address, check=False)
    assert proc.returncode == 2 and "no fleet named 'e2e'" in proc.stderr
    assert not (pdserve_cli.state_dir / f"fleet-{NAME}.json").exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
