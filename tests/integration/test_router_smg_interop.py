"""Interop: sglang-router (smg, the Rust PD router) in --pd-disaggregation mode in front of pdserve-protocol
workers serves correct completions. Written against the fake worker (proves the protocol surface: SGLang
identity, bootstrap port, rooms, /generate JSON and SSE, OpenAI endpoints); rerun against real workers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from pdserve.router.bench_util import free_port, stop
from pdserve.router.testing import FakeWorkerProcess, start_workers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                       reason="sglang-router not installed"),
]
H = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def smg(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, FakeWorkerProcess, FakeWorkerProcess]]:
    d = tmp_path_factory.mktemp("smg")
    prefill, decode = start_workers(["prefill", "decode"], d, d)
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
           "--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url,
           "--prefill-policy", "cache_aware", "--decode-policy", "round_robin",
           "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(free_port()), "--log-level", "warn",
           "--worker-startup-timeout-secs", "30"]
    log = (d / "smg.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"smg exited: {(d / 'smg.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("smg did not become healthy in 60 s")
            time.sleep(0.2)
        yield url, prefill, decode
    finally:
        stop(proc)
        log.close()
        prefill.close()
        decode.close()


def test_generate_json_and_stream(smg: tuple[str, FakeWorkerProcess, FakeWorkerProcess]) -> None:
    url, prefill, decode = smg
    body = {"input_ids": [11, 12, 13], "sampling_params": {"max_new_tokens": 4}}
    direct_ids = None
    res = httpx.post(f"{url}/generate", json=body, headers=H, timeout=30)
    assert res.status_code == 200, res.text
    out = res.json()
    assert len(out["output_ids"]) == 4 and out["meta_info"]["finish_reason"]["type"] == "length"
    direct_ids = out["output_ids"]
    res = httpx.post(f"{url}/generate", json={**body, "stream": True}, headers=H, timeout=30)
    events = [e[6:] for e in res.content.split(b"\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["output_ids"] == direct_ids
    res = httpx.post(f"{url}/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 2}},
                     headers=H, timeout=30)
    assert res.status_code == 200 and len(res.json()["output_ids"]) == 2
    ps = httpx.get(f"{prefill.url}/fake/stats").json()
    ds = httpx.get(f"{decode.url}/fake/stats").json()
    assert ps["rooms"] and ps["rooms"] == ds["rooms"], "smg sent both legs the same bootstrap room"
    assert ps["completed"] == ds["completed"] == 3


def test_openai_endpoints(smg: tuple[str, FakeWorkerProcess, FakeWorkerProcess]) -> None:
    url, _, _ = smg
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    res = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=H, timeout=30)
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["choices"][0]["message"]["content"].count(" t") == 3
    assert out["usage"]["completion_tokens"] == 3
    res = httpx.post(f"{url}/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 2,
                                                    "stream": True}, headers=H, timeout=30)
    events = [e[6:] for e in res.content.split(b"\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and len(events) == 3
