"""Greedy output is identical token for token across PD (shm and tcp transports), colocated
(``both``) and the engine's offline generation — native ``/generate`` and the stock ``openai``
client, streaming and not — and every KV page comes back afterwards.

Real worker processes on 127.0.0.1, started once for the module: a prefill+decode pair per
transport and one colocated worker. PD requests go through a tiny test-side dispatcher that adds
the bootstrap triple and calls both legs concurrently (what a PD router does). The prefill
workers run chunked prefill (64-token budget) so long prompts stream their KV layer by layer
over several chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from pdserve.decode_worker.testing import (
    HOST,
    WorkerProcess,
    free_port,
    pd_post,
    pd_stream,
    spawn_worker,
    stop_all,
    with_bootstrap,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MAX_TOKENS = 8
ENGINE_ARGS = ["--num-blocks", "256", "--max-model-len", "1024", "--max-num-seqs", "16"]
PREFILL_ARGS = ["--max-num-batched-tokens", "64"]
_rng = random.Random(1234)
# lengths around block (16) and chunk (64) boundaries; the last one extends the third (prefix cache)
PROMPTS: list[list[int]] = [
    [_rng.randrange(10, 8000) for _ in range(n)] for n in (3, 15, 16, 17, 33, 64, 90, 150)
]
PROMPTS.append(PROMPTS[2] + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
PROMPTS.append(PROMPTS[6] + PROMPTS[0])
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def workers(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("pd-parity-logs")
    model = ["--model", str(default_model_dir), *ENGINE_ARGS]
    procs: dict[str, WorkerProcess] = {}
    try:
        for transport in ("shm", "tcp"):
            procs[f"prefill-{transport}"] = spawn_worker(
                "prefill", logs, transport=transport, extra_args=[*model, *PREFILL_ARGS]
            )
            procs[f"decode-{transport}"] = spawn_worker("decode", logs, transport=transport, extra_args=model)
        procs["both"] = spawn_worker("both", logs, extra_args=model)
        for w in procs.values():
            w.wait_ready(180.0)
        yield procs
    finally:
        stop_all(list(procs.values()))


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> dict[str, Any]:
    """Offline generation with the engine itself (same engine settings as the workers)."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(
        EngineConfig(model=str(default_model_dir), num_blocks=256, max_model_len=1024, max_num_seqs=16,
                     show_progress=False)
    )  # fmt: skip
    done = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return {"ids": [c.output_ids for c in done], "text": [c.text for c in done]}


def _pair(workers: dict[str, WorkerProcess], transport: str) -> tuple[WorkerProcess, WorkerProcess]:
    return workers[f"prefill-{transport}"], workers[f"decode-{transport}"]


def _native(prompt: list[int], stream: bool = False) -> dict[str, Any]:
    return {
        "input_ids": prompt,
        "stream": stream,
        "sampling_params": {"max_new_tokens": MAX_TOKENS, **GREEDY},
    }


async def _stream_ids(resp: httpx.Response) -> list[int]:
    """The output ids of a native SSE stream (cumulative chunks: the last one has them all)."""
    assert resp.status_code == 200, await resp.aread()
    last: dict[str, Any] = {}
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        last = orjson.loads(line[6:])
        assert "error" not in last, last
    assert done and last["meta_info"]["finish_reason"]["type"] == "length"
    return list(last["output_ids"])


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_native_generate_pd_equals_offline(
    workers: dict[str, WorkerProcess], reference: dict[str, Any], transport: str
) -> None:
    prefill, decode = _pair(workers, transport)
    async with httpx.AsyncClient(timeout=60.0) as client:
        results = await asyncio.gather(
            *(pd_post(client, prefill, decode, "/generate", _native(p)) for p in PROMPTS)
        )
    for i, (d_resp, p_resp) in enumerate(results):
        assert d_resp.status_code == 200, d_resp.text
        assert p_resp.status_code == 200, p_resp.text
        assert d_resp.json()["output_ids"] == reference["ids"][i], f"prompt {i}"
        # the prefill leg answers with the one token it sampled: the decode's first token
        assert p_resp.json()["output_ids"] == reference["ids"][i][:1]
        assert d_resp.json()["meta_info"]["prompt_tokens"] == len(PROMPTS[i])


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_native_stream_pd_equals_offline(
    workers: dict[str, WorkerProcess], reference: dict[str, Any], transport: str
) -> None:
    prefill, decode = _pair(workers, transport)

    async def one(prompt: list[int]) -> list[int]:
        async with pd_stream(client, prefill, decode, "/generate", _native(prompt, stream=True)) as (
            d,
            p_leg,
        ):
            ids = await _stream_ids(d)
        assert (await p_leg).status_code == 200
        return ids

    async with httpx.AsyncClient(timeout=60.0) as client:
        got = await asyncio.gather(*(one(p) for p in PROMPTS))
    assert got == reference["ids"]


async def test_colocated_equals_offline(workers: dict[str, WorkerProcess], reference: dict[str, Any]) -> None:
    both = workers["both"]
    async with httpx.AsyncClient(timeout=60.0) as client:
        plain = await asyncio.gather(*(client.post(both.url + "/generate", json=_native(p)) for p in PROMPTS))
        streamed = []
        for p in PROMPTS[:4]:
            async with client.stream("POST", both.url + "/generate", json=_native(p, stream=True)) as resp:
                streamed.append(await _stream_ids(resp))
    assert [r.json()["output_ids"] for r in plain] == reference["ids"]
    assert streamed == reference["ids"][:4]


async def test_openai_completions_pd_colocated_offline(
    workers: dict[str, WorkerProcess], reference: dict[str, Any]
) -> None:
    """The stock openai client against the decode worker (the prefill leg sent alongside)."""
    from openai import AsyncOpenAI

    both = workers["both"]
    model = (await _models(both))[0]
    clients = {
        w.url: AsyncOpenAI(base_url=w.url + "/v1", api_key="none", max_retries=0, timeout=60.0)
        for w in (both, workers["decode-shm"], workers["decode-tcp"])
    }

    async def completion(base: str, prompt: list[int], stream: bool, extra: dict[str, Any]) -> str:
        oai = clients[base]
        kwargs: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "extra_body": {"ignore_eos": True, **extra},
        }
        if not stream:
            resp = await oai.completions.create(**kwargs)
            assert resp.choices[0].finish_reason == "length"
            return resp.choices[0].text
        return "".join(
            [chunk.choices[0].text async for chunk in await oai.completions.create(stream=True, **kwargs)]
        )

    async def pd(transport: str, prompt: list[int], stream: bool) -> str:
        prefill, decode = _pair(workers, transport)
        triple = with_bootstrap({}, prefill)
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, **triple,
                "ignore_eos": True, "stream": stream}  # fmt: skip
        p_leg = asyncio.ensure_future(http.post(prefill.url + "/v1/completions", json=body))
        text = await completion(decode.url, prompt, stream, triple)
        assert (await p_leg).status_code == 200
        return text

    texts: dict[str, list[str]] = {}
    async with httpx.AsyncClient(timeout=60.0) as http:
        try:
            for transport in ("shm", "tcp"):
                for stream in (False, True):
                    key = f"{transport}-stream={stream}"
                    texts[key] = list(await asyncio.gather(*(pd(transport, p, stream) for p in PROMPTS)))
            texts["both"] = list(await asyncio.gather(*(completion(both.url, p, True, {}) for p in PROMPTS)))
        finally:
            for oai in clients.values():
                await oai.close()
    for key, got in texts.items():
        assert got == reference["text"], key


async def test_openai_chat_pd_equals_colocated(workers: dict[str, WorkerProcess]) -> None:
    from openai import AsyncOpenAI

    both = workers["both"]
    model = (await _models(both))[0]
    conversations = [
        [{"role": "user", "content": "Hello there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "user", "content": "A longer question " * 12}],
    ]

    async def chat(base: str, messages: list[dict[str, str]], stream: bool, extra: dict[str, Any]) -> str:
        oai = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60.0)
        kw: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
        }
        body = {"ignore_eos": True, **extra}
        try:
            if not stream:
                msg = (await oai.chat.completions.create(**kw, extra_body=body)).choices[0].message
                return f"{getattr(msg, 'reasoning_content', None) or ''}|{msg.content or ''}"
            parts, reasoning = [], []
            async for chunk in await oai.chat.completions.create(**kw, stream=True, extra_body=body):
                delta = chunk.choices[0].delta
                parts.append(delta.content or "")
                reasoning.append(getattr(delta, "reasoning_content", None) or "")
            return f"{''.join(reasoning)}|{''.join(parts)}"
        finally:
            await oai.close()

    async def pd(transport: str, messages: list[dict[str, str]], stream: bool) -> str:
        prefill, decode = _pair(workers, transport)
        triple = with_bootstrap({}, prefill)
        body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "ignore_eos": True, "stream": stream, **triple}  # fmt: skip
        async with httpx.AsyncClient(timeout=60.0) as client:
            p_leg = asyncio.ensure_future(client.post(prefill.url + "/v1/chat/completions", json=body))
            out = await chat(decode.url, messages, stream, triple)
            assert (await p_leg).status_code == 200
        return out

    expected = [await chat(both.url, m, False, {}) for m in conversations]
    assert all(e != "|" for e in expected)
    for transport, stream in (("shm", True), ("tcp", False)):
        got = await asyncio.gather(*(pd(transport, m, stream) for m in conversations))
        assert list(got) == expected, (transport, stream)


@pytest.fixture(scope="module")
def pd_router(
    workers: dict[str, WorkerProcess], default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """pdserve's own router in front of the shm pair (local prefill off: every request goes PD)."""
    prefill, decode = _pair(workers, "shm")
    port = free_port()
    model = (httpx.get(decode.url + "/v1/models", timeout=10.0)).json()["data"][0]["id"]
    cmd = [
        sys.executable, "-m", "pdserve", "--log-level=warning", "router", "--host", HOST, "--port", str(port),
        "--prefill", prefill.url, str(prefill.bootstrap_port), "--decode", decode.url,
        "--model", str(default_model_dir), "--served-model-name", model, "--local-prefill-threshold", "0",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("pd-router-logs") / "router.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60.0
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readiness", timeout=2.0).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15.0)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_pdserve_router_native_and_openai(pd_router: str, reference: dict[str, Any]) -> None:
    from openai import AsyncOpenAI

    async with httpx.AsyncClient(timeout=60.0) as client:
        plain = await asyncio.gather(
            *(client.post(pd_router + "/generate", json=_native(p)) for p in PROMPTS)
        )
        assert [r.json().get("output_ids") for r in plain] == reference["ids"], [r.text for r in plain][:2]
        async with client.stream("POST", pd_router + "/generate", json=_native(PROMPTS[5], True)) as resp:
            assert await _stream_ids(resp) == reference["ids"][5]
        model = (await client.get(pd_router + "/v1/models")).json()["data"][0]["id"]
    oai = AsyncOpenAI(base_url=pd_router + "/v1", api_key="none", max_retries=0, timeout=60.0)
    try:
        for i in (0, 4, 7):
            kw: dict[str, Any] = {"model": model, "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS,
                                  "temperature": 0.0, "extra_body": {"ignore_eos": True}}  # fmt: skip
            assert (await oai.completions.create(**kw)).choices[0].text == reference["text"][i]
            pieces = [
                c.choices[0].text async for c in await oai.completions.create(stream=True, **kw) if c.choices
            ]
            assert "".join(pieces) == reference["text"][i]
    finally:
        await oai.close()


async def test_pdserve_router_disconnect_frees_pages(
    pd_router: str, workers: dict[str, WorkerProcess]
) -> None:
    prefill, decode = _pair(workers, "shm")
    body = {"input_ids": PROMPTS[7], "stream": True,
            "sampling_params": {"max_new_tokens": 600, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
    async with httpx.AsyncClient(timeout=60.0) as client:
        async with client.stream("POST", pd_router + "/generate", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        for w in (prefill, decode):
            (load,) = await _settled_load(client, w)
            assert load["free_kv_blocks"] == load["total_kv_blocks"] and load["num_running_reqs"] == 0, load


async def test_every_page_returned_and_metrics(workers: dict[str, WorkerProcess]) -> None:
    """Runs last: after all the traffic above, no page is held or reserved anywhere."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        for name, w in workers.items():
            (load,) = await _settled_load(client, w)
            assert load["free_kv_blocks"] == load["total_kv_blocks"] == 256, (name, load)
            assert load["held_kv_blocks"] == 0 and load["kv_transfer_rooms"] == 0, (name, load)
            assert load["num_running_reqs"] == load["num_waiting_reqs"] == 0, (name, load)
        decode_metrics = (await client.get(workers["decode-tcp"].url + "/metrics")).text
        prefill_metrics = (await client.get(workers["prefill-shm"].url + "/metrics")).text
    assert _value(decode_metrics, 'pdserve:worker_requests_total{leg="decode",outcome="ok"}') >= len(PROMPTS)
    assert _value(decode_metrics, 'pdserve:worker_kv_transfer_bytes_total{leg="decode"}') > 0
    assert _value(decode_metrics, 'pdserve:worker_ttft_seconds_count{leg="decode"}') >= len(PROMPTS)
    assert _value(decode_metrics, 'pdserve:worker_inter_token_latency_seconds_count{leg="decode"}') > 0
    assert _value(prefill_metrics, 'pdserve:worker_requests_total{leg="prefill",outcome="ok"}') >= len(
        PROMPTS
    )
    assert _value(prefill_metrics, 'pdserve:kv_transfer_bytes_total{side="prefill",transport="shm"}') > 0
    assert "pdserve:engine_steps_total" in prefill_metrics


async def _settled_load(client: httpx.AsyncClient, w: WorkerProcess) -> list[dict[str, Any]]:
    """``/get_load`` once nothing is in flight (the last aborts/releases are asynchronous)."""
    for _ in range(100):
        load = (await client.get(w.url + "/get_load")).json()
        if load[0]["free_kv_blocks"] == load[0]["total_kv_blocks"] and not load[0]["kv_transfer_rooms"]:
            break
        await asyncio.sleep(0.05)
    return list(load)


async def _models(w: WorkerProcess) -> list[str]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        data = (await client.get(w.url + "/v1/models")).json()
    assert all(m["owned_by"] == "sglang" for m in data["data"])
    return [m["id"] for m in data["data"]]


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not exported")
