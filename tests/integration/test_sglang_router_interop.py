"""sglang-router (PyPI, the Rust ``smg`` gateway) in PD mode in front of REAL pdserve workers.

The router picks SGLang bootstrap PD from the workers' identity (``owned_by: "sglang"``,
``/version``), probes the prefill's bootstrap port, loads the tokenizer from ``model_path`` and
sends every request to both legs with the bootstrap triple. Its answers must equal the engine's
offline generation token for token, and both workers must end with every page free.
Skipped (with the reason) only when the router is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from pdserve.decode_worker.testing import HOST, WorkerProcess, free_port, spawn_worker, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

if importlib.util.find_spec("sglang_router") is None or shutil.which("smg") is None:
    pytest.skip("sglang-router (the smg router binary) is not installed", allow_module_level=True)

MAX_TOKENS = 6
ARGS = ["--num-blocks", "256", "--max-model-len", "1024", "--max-num-seqs", "16"]
_rng = random.Random(99)
PROMPTS = [[_rng.randrange(10, 8000) for _ in range(n)] for n in (5, 16, 29, 70)]


@pytest.fixture(scope="module")
def cluster(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("smg-interop-logs")
    args = ["--model", str(default_model_dir), *ARGS]
    prefill = spawn_worker("prefill", logs, transport="tcp", extra_args=args)
    decode = spawn_worker("decode", logs, transport="tcp", extra_args=args)
    router: subprocess.Popen[bytes] | None = None
    port = free_port()
    try:
        prefill.wait_ready(180.0)
        decode.wait_ready(180.0)
        cmd = [
            sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
            "--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url,
            "--host", HOST, "--port", str(port), "--prometheus-port", str(free_port()),
            "--policy", "round_robin", "--log-level", "warn",
        ]  # fmt: skip
        with open(logs / "router.log", "wb") as log:
            router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://{HOST}:{port}"
        _wait_router(url, router, logs / "router.log")
        yield {"url": url, "prefill": prefill, "decode": decode}
    finally:
        if router is not None:
            router.terminate()
            try:
                router.wait(15.0)
            except subprocess.TimeoutExpired:
                router.kill()
        stop_all([prefill, decode])


def _wait_router(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    """Until the router answers a real PD generation (its workers registered and healthy)."""
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1}}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"router exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if client.post(url + "/generate", json=body).status_code == 200:
                    return
            time.sleep(0.5)
    raise AssertionError(f"router not serving within {timeout_s} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> list[list[int]]:
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(default_model_dir), num_blocks=256, max_model_len=1024,
                                    show_progress=False))  # fmt: skip
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [c.output_ids for c in engine.generate(PROMPTS, params)]


def _native(prompt: list[int], stream: bool) -> dict[str, Any]:
    params = {"max_new_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    return {"input_ids": prompt, "stream": stream, "sampling_params": params}


async def test_native_generate_through_smg(cluster: dict[str, Any], reference: list[list[int]]) -> None:
    url = cluster["url"]
    async with httpx.AsyncClient(timeout=60.0) as client:
        plain = await asyncio.gather(
            *(client.post(url + "/generate", json=_native(p, False)) for p in PROMPTS)
        )
        assert [r.status_code for r in plain] == [200] * len(PROMPTS), [r.text for r in plain]
        assert [r.json()["output_ids"] for r in plain] == reference
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            async with client.stream("POST", url + "/generate", json=_native(prompt, True)) as resp:
                assert resp.status_code == 200
                events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert orjson.loads(events[-2])["output_ids"] == expected


async def test_openai_client_through_smg(cluster: dict[str, Any]) -> None:
    from openai import AsyncOpenAI

    url, decode = cluster["url"], cluster["decode"]
    async with httpx.AsyncClient(timeout=30.0) as client:
        model = (await client.get(decode.url + "/v1/models")).json()["data"][0]["id"]
    messages = [{"role": "user", "content": "Tell me about disaggregated serving."}]
    kw: dict[str, Any] = {
        "model": model,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    direct = AsyncOpenAI(base_url=decode.url + "/v1", api_key="none", max_retries=0, timeout=60.0)
    routed = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60.0)
    try:
        # colocated reference: the decode worker prefilling locally (no bootstrap triple)
        want_chat = (await direct.chat.completions.create(messages=messages, **kw)).choices[0].message
        # smg 0.3.2 accepts only text prompts on /v1/completions (token-id lists get its own 422)
        prompt = "Prefill and decode run on different workers"
        want_text = (await direct.completions.create(prompt=prompt, **kw)).choices[0].text
        got_chat = (await routed.chat.completions.create(messages=messages, **kw)).choices[0].message
        assert (got_chat.content, getattr(got_chat, "reasoning_content", None)) == (
            want_chat.content, getattr(want_chat, "reasoning_content", None))  # fmt: skip
        content, reasoning = "", ""
        async for chunk in await routed.chat.completions.create(messages=messages, stream=True, **kw):
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
        assert content == (want_chat.content or "")
        assert reasoning == (getattr(want_chat, "reasoning_content", None) or "")
        got_text = (await routed.completions.create(prompt=prompt, **kw)).choices[0].text
        assert got_text == want_text
    finally:
        await direct.close()
        await routed.close()


async def test_requests_really_went_pd_and_pages_came_back(cluster: dict[str, Any]) -> None:
    prefill: WorkerProcess = cluster["prefill"]
    decode: WorkerProcess = cluster["decode"]
    async with httpx.AsyncClient(timeout=10.0) as client:
        p_metrics = (await client.get(prefill.url + "/metrics")).text
        d_metrics = (await client.get(decode.url + "/metrics")).text
        assert _value(p_metrics, 'pdserve:worker_requests_total{leg="prefill",outcome="ok"}') >= 2 * len(
            PROMPTS
        )
        assert _value(d_metrics, 'pdserve:worker_requests_total{leg="decode",outcome="ok"}') >= 2 * len(
            PROMPTS
        )
        assert _value(d_metrics, 'pdserve:kv_transfer_bytes_total{side="decode",transport="tcp"}') > 0
        for w in (prefill, decode):
            for _ in range(100):
                (load,) = (await client.get(w.url + "/get_load")).json()
                if load["free_kv_blocks"] == load["total_kv_blocks"] and load["kv_transfer_rooms"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert load["free_kv_blocks"] == load["total_kv_blocks"], (w.role, load)


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not exported")
