"""deploy/prometheus and deploy/grafana against a real Prometheus scraping a real fleet.

1. promtool checks the scrape config, the rule file, and every dashboard query (fed to it as
   recording rules, so Prometheus' own parser reads each one).
2. The live test starts Prometheus on 127.0.0.1 (free port, tmp data dir, 1 s scrape and rule
   evaluation) with a copy of deploy/prometheus/{prometheus,rules}.yml, and a real fleet with
   ``pdserve up`` (embedded Ray cluster on loopback, real router and workers on the tiny default
   model) that writes the file_sd targets Prometheus follows. It then sends traffic: PD requests
   (KV transfer), a streamed request the client abandons (cancelled legs), a request failing on an
   injected sick decode worker (retry, leg failure, breaker opening) and a decode request whose
   prefill peer is dead (KV transfer failure). Finally every dashboard query, every recording rule
   and every alert's signal (its expression without the threshold) must return data.

Only the prometheus binaries are optional: without them the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pdserve.router.bench_util import free_port
from pdserve.router.testing import FakeWorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve-dashboard.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)
FLEET = "promlive"
MODEL_NAME = "promlive-model"
# Same convention as tests/unit/test_observability_files.py: `<signal> <cmp> <literal>`.
THRESHOLD_RE = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?[0-9.]+(?:e[+-]?[0-9]+)?(?=\s|\)|$)")


def dashboard_queries(fleet: str) -> dict[str, str]:
    data = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in data["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$fleet", fleet)
            out[f"panel {panel['title']!r} {t['refId']}"] = expr
    return out


_SETOPS = re.compile(r"\s(?:and|or|unless)\s")


def alert_signals(expr: str) -> list[str]:
    """``(a > 0.1 and b > 0.1) or c == 0`` -> ``["a", "b", "c"]``: the set operands of an alert,
    each without its numeric threshold (which only holds under a real failure)."""
    signals = []
    for part in _SETOPS.split(" ".join(expr.split())):
        part = part.strip()
        while part.startswith("(") and part.endswith(")") and _balanced(part[1:-1]):
            part = part[1:-1].strip()
        part = part.lstrip("(").strip() if not _balanced(part) and part.startswith("(") else part
        part = part.rstrip(")").strip() if not _balanced(part) and part.endswith(")") else part
        signals.append(THRESHOLD_RE.sub("", part).strip())
    return [s for s in signals if s]


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def rule_queries() -> dict[str, str]:
    rules = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    out = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out[f"record {rule['record']}"] = rule["record"]  # evaluated and stored
                out[f"record {rule['record']} (expr)"] = rule["expr"]
            else:
                for i, signal_expr in enumerate(alert_signals(rule["expr"])):
                    out[f"alert {rule['alert']} signal {i}"] = signal_expr
    return out


def test_alert_signal_splitting() -> None:
    assert alert_signals('a:b > 0.144\nand\nc{x="1"} > 0.144') == ["a:b", 'c{x="1"}']
    assert alert_signals("(\n a > 0.03\n and b > 0.03\n)\nor\n(c > 0.01)") == ["a", "b", "c"]
    assert alert_signals("max by (f) (m) == 0") == ["max by (f) (m)"]
    assert alert_signals("sum by (f) (x)\n/\n(sum by (f) (y) + z)\n> 0.01") == [
        "sum by (f) (x) / (sum by (f) (y) + z)"]


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_checks_config_and_rules() -> None:
    res = _promtool("check", "config", PROM_DIR / "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    res = _promtool("check", "rules", PROM_DIR / "rules.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    queries = dashboard_queries(".*")
    rules = [{"record": f"dashboard:query_{i}:check", "expr": e} for i, e in enumerate(queries.values())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _promtool("check", "rules", path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout


# -- the live run --------------------------------------------------------------------------------


def _wait(pred: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
        proc.wait(10)


@contextlib.contextmanager
def prometheus(tmp: Path) -> Iterator[str]:
    assert PROMETHEUS is not None
    prom = tmp / "prom"
    (prom / "targets").mkdir(parents=True)
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (prom / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(PROM_DIR / "rules.yml", prom / "rules.yml")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={prom / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(lambda: _get(f"{url}/-/ready") == 200, 30, "prometheus ready", proc)
        yield url
    finally:
        _stop(proc, signal.SIGTERM, 10)
        log.close()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2.0).status_code
    except httpx.HTTPError:
        return 0


@contextlib.contextmanager
def fleet(tmp: Path, model_dir: Path, sd_file: Path) -> Iterator[str]:
    """``pdserve up`` in the foreground (it serves until SIGTERM, then tears everything down)."""
    router_port = free_port()
    config = {
        "engine": {"model": str(model_dir), "num_blocks": 256, "max_model_len": 1024},
        "router": {
            "port": router_port,
            "served_model_name": MODEL_NAME,
            "policy": {"decode": "round_robin"},  # the sick decode worker gets a turn
            "breaker": {"failure_threshold": 1, "open_timeout_s": 120},
            "health": {"interval_s": 1.0},
        },
        "fleet": {
            "name": FLEET,
            "prometheus_sd_file": str(sd_file),
            "ray": {"num_cpus": 8},
            "timeouts": {"health_interval_s": 0.5},
        },
    }
    cfg_path = tmp / "pdserve.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    state = tmp / "state"
    env = {**os.environ, "PDSERVE_STATE_DIR": str(state)}
    out, err = tmp / "up.out", (tmp / "up.log").open("wb")
    with out.open("wb") as out_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", "up", "--config", str(cfg_path), "--state-dir", str(state)],
            stdout=out_fh,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    try:
        _wait(lambda: "http://" in out.read_text(), 200, "pdserve up", proc)
        yield f"http://127.0.0.1:{router_port}"
    finally:
        _stop(proc, signal.SIGTERM, 90)
        err.close()
        if (state / f"{FLEET}.json").exists() or any(state.glob("*.json")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pdserve",
                    "down",
                    "--name",
                    FLEET,
                    "--state-dir",
                    str(state),
                    "--no-drain",
                    "--timeout",
                    "30",
                ],
                env=env,
                timeout=120,
                check=False,
            )


def _sd_roles(sd_file: Path) -> list[str]:
    try:
        return sorted(g["labels"]["role"] for g in json.loads(sd_file.read_text()))
    except (OSError, ValueError):
        return []


def _sd_url(sd_file: Path, role: str) -> str:
    groups = json.loads(sd_file.read_text())
    (group,) = [g for g in groups if g["labels"]["role"] == role]
    return f"http://{group['targets'][0]}"


def _traffic(router: str, sick: FakeWorkerProcess, sd_file: Path) -> None:
    # A decode request whose prefill peer never answers: a KV transfer failure (decode side),
    # in the background while the rest runs (it takes the peer-death timeout, ~3 s).
    decode_url = _sd_url(sd_file, "decode")
    dead = {
        "input_ids": [5, 6, 7, 8],
        "sampling_params": {"max_new_tokens": 2},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": free_port(),
        "bootstrap_room": 4242,
    }
    bg = threading.Thread(target=lambda: httpx.post(f"{decode_url}/generate", json=dead, timeout=60))
    bg.start()
    try:
        sick.wait_ready()
        httpx.post(f"{sick.url}/fake/config", json={"fail_next": 1000, "fail_status": 503}).raise_for_status()
        with httpx.Client(base_url=router, timeout=60) as c:
            c.post("/workers", json={"url": sick.url, "role": "decode"}).raise_for_status()
            for i in range(4):  # round robin: one of these lands on the sick worker and is retried
                r = c.post(
                    "/generate",
                    json={
                        "text": f"request {i} about prefill and decode",
                        "sampling_params": {"max_new_tokens": 4},
                    },
                )
                assert r.status_code == 200, r.text
            chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            assert c.post("/v1/chat/completions", json=chat).status_code == 200
            assert c.post("/v1/chat/completions", json={**chat, "model": "nope"}).status_code == 404
            with c.stream(
                "POST", "/v1/chat/completions", json={**chat, "max_tokens": 400, "stream": True}
            ) as s:
                next(s.iter_bytes())  # first chunk, then hang up: the router cancels both legs
        workers = httpx.get(f"{router}/workers", timeout=10).json()["workers"]
        sick_state = next(w for w in workers if w["url"] == sick.url)
        assert sick_state["breaker"] == "open", sick_state
    finally:
        bg.join(60)


def _query(prom: str, expr: str) -> list[Any]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    result: list[Any] = body["data"]["result"]
    return result


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install prometheus)"
)
def test_every_dashboard_and_rule_query_returns_data(tmp_path: Path, default_model_dir: Path) -> None:
    queries = {**dashboard_queries(FLEET), **rule_queries()}
    with prometheus(tmp_path) as prom:
        sd_file = tmp_path / "prom" / "targets" / f"{FLEET}.json"
        # A decode worker that passes health checks but fails every request (started early: it
        # boots while the fleet does).
        sick = FakeWorkerProcess("decode", default_model_dir, tmp_path, served_model_name=MODEL_NAME)
        with contextlib.ExitStack() as stack:
            stack.callback(sick.close)
            router = stack.enter_context(fleet(tmp_path, default_model_dir, sd_file))
            roles = ["controller", "decode", "prefill", "router"]
            _wait(lambda: _sd_roles(sd_file) == roles, 30, "the fleet's Prometheus targets file")
            _wait(lambda: len(_query(prom, f'up{{fleet="{FLEET}"}} == 1')) == 4, 30, "4 targets up")
            _traffic(router, sick, sd_file)
            missing: dict[str, str] = {}
            deadline = time.monotonic() + 30
            while True:
                missing = {k: e for k, e in queries.items() if not _query(prom, e)}
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            # The dashboard's fleet variable: label_values(up{component="router"}, fleet).
            fleets = {s["metric"].get("fleet") for s in _query(prom, 'up{component="router"}')}
    assert not missing, "queries without data:\n" + "\n".join(f"{k}: {e}" for k, e in missing.items())
    assert FLEET in fleets
    assert len(queries) > 80
