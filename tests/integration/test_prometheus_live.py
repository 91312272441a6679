"""Observability, live: a real Prometheus server scrapes a real local fleet (``pdserve up``, tiny
default model) through the service-discovery file the fleet controller writes, and every query
of the Grafana dashboard and of the rules file returns data. ``promtool`` checks the config and
the rules. Needs Debian's ``prometheus`` package (scripts/test.sh installs it); skips without.

Only the evaluation/scrape intervals of deploy/prometheus/prometheus.yml are shortened (to 1 s)
for the test; the queries themselves are used verbatim, with Grafana's variables filled in.
Alert expressions follow the rules file's convention ``<signal> <op> <number>`` joined by
and/or/unless: each signal must return data (the alert itself need not fire)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from pdserve.deploy.server_actor import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not (shutil.which("prometheus") and shutil.which("promtool")),
        reason="Prometheus is not installed (apt-get install prometheus; scripts/test.sh does it)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "pdserve-dashboard.json"
FLEET = "obs"
MODEL = "tiny-glm"


def _pdserve(state_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PDSERVE_STATE_DIR": str(state_dir), "PDSERVE_LOG_LEVEL": "warning"}
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def obs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/prometheus copied next to a targets/ dir, with 1 s scrape/evaluation intervals."""
    out = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (out / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    for rule_file in config.get("rule_files", []):
        shutil.copy(PROM_DIR / rule_file, out / rule_file)
    (out / "targets").mkdir()
    return out


def test_promtool_accepts_the_config_and_rules(obs_dir: Path) -> None:
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["check", "rules", str(PROM_DIR / "rules.yml")]):
        proc = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def fleet(obs_dir: Path, tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[str]:
    state_dir = tmp_path_factory.mktemp("state")
    port = free_port("127.0.0.1")
    config = obs_dir / "fleet.yaml"
    config.write_text(f"""\
engine: {{model: {default_model_dir}, max_model_len: 1024, num_blocks: 256}}
kvtransfer: {{transport: tcp}}
router: {{port: {port}, served_model_name: {MODEL}}}
fleet:
  name: {FLEET}
  prometheus_sd_file: {obs_dir / "targets" / f"{FLEET}.json"}
  timeouts: {{health_interval_s: 0.5}}
""")
    up = _pdserve(state_dir, "up", "--config", str(config), "--detach")
    try:
        assert up.returncode == 0, up.stderr
        yield up.stdout.strip().splitlines()[-1]
    finally:
        down = _pdserve(state_dir, "down", "--name", FLEET, "--no-drain", timeout=300)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def prometheus(obs_dir: Path, fleet: str) -> Iterator[str]:
    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={obs_dir / 'prometheus.yml'}", f"--storage.tsdb.path={obs_dir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(obs_dir / "prometheus.log", "wb"), stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: _get(f"{url}/-/ready") == 200, 60, "Prometheus to be ready", obs_dir)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _until(ok: Any, timeout_s: float, what: str, obs_dir: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            log = (obs_dir / "prometheus.log").read_text()[-2000:] if obs_dir else ""
            raise AssertionError(f"timed out waiting for {what}\n{log}")
        time.sleep(0.5)


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body.get("status") == "success", f"{expr!r}: {body}"
    return list(body["data"]["result"])


def _traffic(router: str) -> None:
    """Requests that exercise every path the dashboard shows: PD chat (streamed and not), text
    completions, a cache-hitting repeat, client errors, and a client that hangs up mid-stream."""
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="none", max_retries=0, timeout=120.0)
    messages = [{"role": "user", "content": "Write a short poem about the sea. " * 8}]
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)  # type: ignore[arg-type]
    for _ in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True):  # type: ignore[arg-type]
        pass
    client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    with pytest.raises(openai.APIStatusError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, stream=True)  # type: ignore[arg-type]
    next(iter(stream))
    stream.close()  # the client goes away mid-stream


def _dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return exprs


def _grafana_vars(expr: str) -> str:
    for var, value in (("__rate_interval", "1m"), ("__interval", "5s"), ("__range", "5m"), ("fleet", FLEET)):
        expr = expr.replace(f"${{{var}}}", value).replace(f"${var}", value)
    return expr


_SETOPS = re.compile(r"\s(and|or|unless)\s")
_THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[0-9.]+(e-?[0-9]+)?\s*$")


def alert_signals(expr: str) -> list[str]:
    """``(a > 1 and b > 1) or c == 0`` -> ``["a", "b", "c"]`` (set operators split at any depth,
    parentheses stripped, one trailing numeric comparison removed)."""
    signals = []
    for part in _SETOPS.split(" ".join(expr.split()))[::2]:
        part = part.strip().strip("()").strip()
        signals.append(_THRESHOLD.sub("", part).strip())
    return [s for s in signals if s]


def test_alert_signal_splitting() -> None:
    assert alert_signals("a:b > 0.144\nand\nc{x=\"1\"} > 0.144") == ["a:b", 'c{x="1"}']
    assert alert_signals("(\n a > 0.03\n and b > 0.03\n)\nor\n(c > 0.01)") == ["a", "b", "c"]
    assert alert_signals("max by (f) (m) == 0") == ["max by (f) (m)"]


def _rule_queries() -> list[tuple[str, str]]:
    queries = []
    for group in yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                queries.append((f"record {rule['record']}", rule["record"]))
                queries.append((f"record {rule['record']} (expr)", rule["expr"]))
            else:
                queries.extend((f"alert {rule['alert']}", s) for s in alert_signals(rule["expr"]))
    return queries


def test_every_dashboard_and_rule_query_returns_data(fleet: str, prometheus: str, obs_dir: Path) -> None:
    targets = json.loads((obs_dir / "targets" / f"{FLEET}.json").read_text())
    assert sorted(g["labels"]["role"] for g in targets) == ["controller", "decode", "prefill", "router"]
    _until(lambda: len([r for r in _query(prometheus, "up == 1") if r["metric"].get("fleet") == FLEET]) >= 4,
           60, "all four fleet targets to be scraped", obs_dir)
    _traffic(fleet)
    time.sleep(4.0)  # a few scrapes and rule evaluations after the traffic
    queries = [(f"dashboard #{i}", _grafana_vars(e)) for i, e in enumerate(_dashboard_exprs())]
    queries += _rule_queries()
    assert len(queries) > 50
    empty = [(where, expr) for where, expr in queries if not _query(prometheus, expr)]
    assert not empty, "queries without data:\n" + "\n".join(f"  {w}: {' '.join(e.split())}" for w, e in empty)
