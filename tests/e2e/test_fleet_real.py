"""The real fleet (engine workers + router, tiny default model) on a local Ray cluster: what the
README's main command runs, driven with the stock openai client, then torn down."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fleet_e2e import PdserveCli, free_port, wait_for

from pdserve.deploy.ray_cluster import LocalRayHead

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NAME = "real"


@pytest.fixture(scope="module")
def real_fleet(
    ray_cluster: LocalRayHead,
    pdserve_cli: PdserveCli,
    default_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    port = free_port("127.0.0.1")
    config = tmp_path_factory.mktemp("real") / "fleet.yaml"
    config.write_text(
        f"""\
engine: {{model: {default_model_dir}, max_model_len: 1024, num_blocks: 256}}
kvtransfer: {{transport: tcp}}
router: {{port: {port}, served_model_name: tiny-glm}}
fleet:
  name: {NAME}
  timeouts: {{health_interval_s: 0.5, startup_s: 300}}
"""
    )
    proc = pdserve_cli(
        "up", "--config", str(config), "--address", ray_cluster.address, "--detach", timeout=600
    )
    info: dict[str, Any] = {"url": proc.stdout.strip().splitlines()[-1], "down": False}
    try:
        yield info
    finally:
        if not info["down"]:
            pdserve_cli("down", "--name", NAME, "--no-drain", check=False, timeout=300)


def test_openai_client_against_the_fleet(real_fleet: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{real_fleet['url']}/v1", api_key="none", max_retries=0, timeout=120.0)
    assert [m.id for m in client.models.list().data] == ["tiny-glm"]
    chat = client.chat.completions.create(
        model="tiny-glm", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in {"length", "stop"}
    assert chat.usage is not None and chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 1
    again = client.chat.completions.create(
        model="tiny-glm", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == chat.choices[0].message.content  # greedy: deterministic
    chunks = list(client.chat.completions.create(
        model="tiny-glm", messages=[{"role": "user", "content": "Tell me more"}], max_tokens=6,
        temperature=0, stream=True,
    ))
    assert chunks and chunks[-1].choices[0].finish_reason in {"length", "stop"}
    text = client.completions.create(model="tiny-glm", prompt="The capital of", max_tokens=5, temperature=0)
    assert text.usage is not None and text.usage.completion_tokens >= 1


def test_status_shows_load_kv_and_transport(real_fleet: dict[str, Any], pdserve_cli: PdserveCli) -> None:
    status = pdserve_cli.status("--name", NAME)
    assert status["ready"]
    for w in status["workers"]:
        assert w["state"] == "healthy" and w["registered"]
        assert w["load"]["transport"] == "tcp"
        assert 0.0 <= w["load"]["kv_usage"] <= 1.0
    table = pdserve_cli("status", "--name", NAME).stdout
    assert "real-prefill-0" in table and "real-decode-0" in table and "tcp" in table


PROMPTS = ["The capital of", "Once upon a time", "1, 2, 3, 4,"]


def _completion(client: openai.OpenAI, prompt: str) -> str:
    out = client.completions.create(model="tiny-glm", prompt=prompt, max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in {"length", "stop"}
    return out.choices[0].text


def _metric_total(url: str, name: str) -> float:
    """Sum of every sample of ``name`` (any labels) in ``url``'s Prometheus text."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert any(f"# TYPE {n} " in text for n in (name, name.removesuffix("_total"))), f"no {name} at {url}"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((f"{name}{{", f"{name} "))
    )


class _GreedyLoad:
    """A few threads of greedy completions against the router, bounded by count and time; keeps
    every (prompt, text) and every failure."""

    def __init__(self, url: str, threads: int = 3, per_thread: int = 400, max_s: float = 240.0) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60.0)
        self.per_thread, self.deadline = per_thread, time.monotonic() + max_s
        self.results: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.results) + len(self.errors)

    def _run(self, offset: int) -> None:
        for i in range(self.per_thread):
            if self._stop.is_set() or time.monotonic() > self.deadline:
                return
            prompt = PROMPTS[(i + offset) % len(PROMPTS)]
            try:
                text = _completion(self.client, prompt)
            except Exception as exc:
                with self._lock:
                    self.errors.append(f"{prompt!r}: {exc!r}"[:300])
            else:
                with self._lock:
                    self.results.append((prompt, text))

    def __enter__(self) -> _GreedyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)
            assert not t.is_alive()


def _assert_fleet(status: dict[str, Any], prefill: int, decode: int) -> dict[str, dict[str, Any]]:
    assert status["ready"] and status["desired"] == {"prefill": prefill, "decode": decode}, status
    workers = {w["name"]: w for w in status["workers"]}
    expected = [f"{NAME}-decode-{i}" for i in range(decode)] + [f"{NAME}-prefill-{i}" for i in range(prefill)]
    assert sorted(workers) == sorted(expected), sorted(workers)
    assert all(w["state"] == "healthy" and w["registered"] for w in workers.values()), workers
    registered = httpx.get(f"{status['router']['url']}/workers", timeout=5).json()["workers"]
    assert sorted(w["url"] for w in registered) == sorted(w["url"] for w in workers.values())
    return workers


def test_scale_up_and_down_under_load_loses_nothing(
    real_fleet: dict[str, Any], pdserve_cli: PdserveCli
) -> None:
    """2P+2D and back to 1P+1D while greedy traffic runs: no request fails, every answer is the
    reference text, the added workers take traffic and are drained before removal. The fleet
    ends at 1P+1D, so the tests after this one see the fleet they expect."""
    url = real_fleet["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60.0)
    reference = {p: _completion(client, p) for p in PROMPTS}  # before any scaling
    assert all(reference.values()), reference
    retries_before = _metric_total(url, "pdserve:router_retries_total")
    leg_failures_before = _metric_total(url, "pdserve:router_leg_failures_total")
    added = [f"{NAME}-prefill-1", f"{NAME}-decode-1"]
    with _GreedyLoad(url) as load:
        wait_for(lambda: load.done >= 3, timeout_s=60, what="the load to get going")
        pdserve_cli("scale", "--name", NAME, "--prefill", "2", "--decode", "2", timeout=300)
        grown = _assert_fleet(pdserve_cli.status("--name", NAME), 2, 2)

        def served_by_added() -> bool:
            return all(_metric_total(grown[n]["url"], "pdserve:worker_requests_total") > 0 for n in added)

        wait_for(served_by_added, timeout_s=60, what=f"{added} to serve requests")
        at_shrink = load.done
        pdserve_cli("scale", "--name", NAME, "--prefill", "1", "--decode", "1", timeout=300)
        shrunk_status = pdserve_cli.status("--name", NAME)
        wait_for(lambda: load.done >= at_shrink + 6, timeout_s=60, what="traffic after the scale-down")
    assert load.errors == [], load.errors
    wrong = [(p, t) for p, t in load.results if t != reference[p]]
    assert wrong == [], f"{len(wrong)}/{len(load.results)} differ from {reference}: {wrong[:5]}"
    shrunk = _assert_fleet(shrunk_status, 1, 1)
    for name in added:
        assert any(f" {name} removed after draining " in e for e in shrunk_status["events"]), (
            name, shrunk_status["events"])
    assert all(shrunk[n]["pid"] == grown[n]["pid"] for n in shrunk)  # the originals kept serving
    # nothing was hidden by the router's retries: no leg failed, nothing retried
    assert _metric_total(url, "pdserve:router_retries_total") == retries_before
    assert _metric_total(url, "pdserve:router_leg_failures_total") == leg_failures_before
    assert {p: _completion(client, p) for p in PROMPTS} == reference


def test_down_removes_the_real_fleet(real_fleet: dict[str, Any], pdserve_cli: PdserveCli) -> None:
    status = pdserve_cli.status("--name", NAME)
    pids = [status["router"]["pid"], *(w["pid"] for w in status["workers"])]
    pdserve_cli("down", "--name", NAME, timeout=300)
    real_fleet["down"] = True
    wait_for(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], timeout_s=60,
             what=f"fleet processes {pids} to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{real_fleet['url']}/health", timeout=2)
