"""PD failure paths on real worker processes: every failure is a clean, prompt error (never a
hang), cancelling one leg cancels the other, and every KV page comes back on both workers.

One prefill + decode pair (shm) for the module, with short kvtransfer timeouts from the
environment (heartbeat 0.2 s x 3, bootstrap 3 s). The last test kills the prefill worker.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from pdserve.decode_worker.testing import (
    WorkerProcess,
    free_port,
    pd_stream,
    spawn_worker,
    stop_all,
    with_bootstrap,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ENV = {
    "PDSERVE_KVTRANSFER__HEARTBEAT_INTERVAL_S": "0.2",
    "PDSERVE_KVTRANSFER__HEARTBEAT_MISSES": "3",
    "PDSERVE_KVTRANSFER__BOOTSTRAP_TIMEOUT_S": "3",
    "PDSERVE_KVTRANSFER__ABORT_TIMEOUT_S": "1",
}
ARGS = ["--num-blocks", "256", "--max-model-len", "1024", "--max-num-seqs", "16"]
PROMPT = [random.Random(7).randrange(10, 8000) for _ in range(40)]


@pytest.fixture(scope="module")
def pair(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("pd-failure-logs")
    args = ["--model", str(default_model_dir), *ARGS]
    prefill = spawn_worker("prefill", logs, transport="shm", extra_args=args, env=ENV)
    decode = spawn_worker("decode", logs, transport="shm", extra_args=args, env=ENV)
    try:
        prefill.wait_ready(180.0)
        decode.wait_ready(180.0)
        yield prefill, decode
    finally:
        stop_all([prefill, decode])


def _native(max_new_tokens: int = 8, stream: bool = False, prompt: list[int] = PROMPT) -> dict[str, Any]:
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    return {"input_ids": prompt, "stream": stream, "sampling_params": params}


async def _load(client: httpx.AsyncClient, w: WorkerProcess) -> dict[str, Any]:
    data = (await client.get(w.url + "/get_load")).json()
    return dict(data[0])


async def _all_pages_back(client: httpx.AsyncClient, *workers: WorkerProcess, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    loads: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        loads = [await _load(client, w) for w in workers if w.alive()]
        if all(
            ld["free_kv_blocks"] == ld["total_kv_blocks"] and ld["kv_transfer_rooms"] == 0
            and ld["num_running_reqs"] == 0 and ld["num_waiting_reqs"] == 0
            for ld in loads
        ):  # fmt: skip
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pages not returned within {within_s} s: {loads}")


async def _until(
    client: httpx.AsyncClient, w: WorkerProcess, key: str, value: int, within_s: float = 10.0
) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if (await _load(client, w))[key] == value:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{w.role}: {key} never became {value}: {await _load(client, w)}")


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def test_client_disconnect_mid_stream_frees_every_page(
    pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    prefill, decode = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        await _all_pages_back(client, prefill, decode)
        before = _metric((await client.get(decode.url + "/metrics")).text,
                         'pdserve:worker_requests_total{leg="decode",outcome="aborted"}')  # fmt: skip
        async with pd_stream(client, prefill, decode, "/generate", _native(600, stream=True)) as (
            resp,
            p_leg,
        ):
            assert resp.status_code == 200
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    assert '"finish_reason":null' in line.replace(" ", "") or seen == 0
                    seen += 1
                    if seen == 3:
                        break  # leaving the block closes the connection mid-stream
            assert (await p_leg).status_code == 200
        load = await _load(client, decode)
        await _all_pages_back(client, prefill, decode)
        after = _metric((await client.get(decode.url + "/metrics")).text,
                        'pdserve:worker_requests_total{leg="decode",outcome="aborted"}')  # fmt: skip
    assert after == before + 1, load


async def test_disconnect_while_decode_waits_for_kv(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    """Only the decode leg arrives (its prefill leg was lost); the client gives up: the decode
    aborts its room (telling the prefill) and releases its reservation."""
    prefill, decode = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        body = with_bootstrap(_native(8), prefill)
        task = asyncio.ensure_future(client.post(decode.url + "/generate", json=body))
        await _until(client, decode, "awaiting_kv_reqs", 1)
        assert (await _load(client, decode))["free_kv_blocks"] < 256  # pages are reserved
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _all_pages_back(client, prefill, decode)


async def test_disconnect_while_prefill_waits_for_decode(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    prefill, decode = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        body = with_bootstrap(_native(8), prefill)
        task = asyncio.ensure_future(client.post(prefill.url + "/generate", json=body))
        await _until(client, prefill, "awaiting_decode_reqs", 1)
        assert (await _load(client, prefill))["kv_transfer_rooms"] == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _until(client, prefill, "awaiting_decode_reqs", 0, within_s=3.0)
        await _all_pages_back(client, prefill, decode)
        # the room is gone: a late decode registration for it fails fast instead of hanging
        t0 = time.monotonic()
        late = await client.post(decode.url + "/generate", json=body)
        assert 400 <= late.status_code < 600 and late.status_code != 200, late.text
        assert time.monotonic() - t0 < 8.0
        assert "error" in late.json()
        await _all_pages_back(client, prefill, decode)


async def test_prefill_without_decode_times_out_cleanly(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    prefill, decode = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        t0 = time.monotonic()
        resp = await client.post(prefill.url + "/generate", json=with_bootstrap(_native(8), prefill))
        elapsed = time.monotonic() - t0
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["type"] == "timeout_error"
        assert 2.5 < elapsed < 8.0
        await _all_pages_back(client, prefill, decode)


async def test_decode_with_unreachable_prefill_fails_fast(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    prefill, decode = pair
    body = {**_native(8), "bootstrap_host": "127.0.0.1", "bootstrap_port": free_port(), "bootstrap_room": 99}
    async with httpx.AsyncClient(timeout=30.0) as client:
        t0 = time.monotonic()
        resp = await client.post(decode.url + "/generate", json=body)
        assert resp.status_code in (502, 504), resp.text
        assert time.monotonic() - t0 < 6.0
        await _all_pages_back(client, prefill, decode)


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/v1/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, 404),
        ("/v1/completions", {"model": "{model}", "prompt": "hi", "max_tokens": 4, "temperature": 7}, 400),
        ("/generate", {"input_ids": [5] * 1100, "sampling_params": {"max_new_tokens": 4}}, 400),
        ("/generate", {"input_ids": [5, 999999], "sampling_params": {"max_new_tokens": 4}}, 400),
        ("/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2000}}, 400),
    ],
)
async def test_bad_pd_requests_are_4xx_on_both_legs(
    pair: tuple[WorkerProcess, WorkerProcess], path: str, body: dict[str, Any], status: int
) -> None:
    prefill, decode = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        model = (await client.get(decode.url + "/v1/models")).json()["data"][0]["id"]
        if body.get("model") == "{model}":
            body = {**body, "model": model}
        full = with_bootstrap(body, prefill)
        for w in (prefill, decode):
            resp = await client.post(w.url + path, json=full)
            assert resp.status_code == status, (w.role, resp.text)
            assert set(resp.json()["error"]) >= {"message", "type", "code"}
        await _all_pages_back(client, prefill, decode)


async def test_prefill_worker_needs_the_bootstrap_triple(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    prefill, _ = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        resp = await client.post(prefill.url + "/generate", json=_native(4))
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "bootstrap_host"


async def test_decode_without_triple_prefills_locally(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    """Conditional disaggregation: a decode worker serves a short prompt on its own."""
    prefill, decode = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        resp = await client.post(decode.url + "/generate", json=_native(4))
        assert resp.status_code == 200 and len(resp.json()["output_ids"]) == 4
        text = (await client.get(decode.url + "/metrics")).text
        assert _metric(text, 'pdserve:worker_requests_total{leg="local",outcome="ok"}') >= 1
        await _all_pages_back(client, prefill, decode)


async def test_abort_request_stops_a_pd_stream(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    prefill, decode = pair
    rid = f"abort-me-{random.getrandbits(32)}"
    async with httpx.AsyncClient(timeout=30.0) as client:
        body = {**_native(600, stream=True), "rid": rid}
        async with pd_stream(client, prefill, decode, "/generate", body) as (resp, _):
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: ")
            ack = await client.post(decode.url + "/abort_request", json={"rid": rid})
            assert ack.status_code == 200 and ack.json()["aborted"] == 1
            rest = [line async for line in lines if line.startswith("data: ")]
        # SGLang style: the stream ends with finish_reason {"type": "abort"} (or an error event)
        assert rest[-1] == "data: [DONE]", rest[-3:]
        last = orjson.loads(rest[-2][6:])
        assert "error" in last or last["meta_info"]["finish_reason"]["type"] == "abort", last
        assert len(last.get("output_ids", [])) < 600
        await _all_pages_back(client, prefill, decode)
        bad = await client.post(decode.url + "/abort_request", content=b"[1, 2]")
        assert bad.status_code == 400


async def test_fake_bootstrap_host_is_sglang_warmup(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    """SGLang's warmup: a request naming the fake bootstrap host completes at once on each leg
    alone (no rendezvous, no transfer) and holds no page afterwards."""
    prefill, decode = pair
    body = {**_native(3), "bootstrap_host": "2.2.2.2", "bootstrap_port": 8998, "bootstrap_room": 7}
    async with httpx.AsyncClient(timeout=30.0) as client:
        t0 = time.monotonic()
        p_resp, d_resp = await asyncio.gather(
            client.post(prefill.url + "/generate", json=body),
            client.post(decode.url + "/generate", json=body),
        )
        assert time.monotonic() - t0 < 5.0
        assert p_resp.status_code == 200 and len(p_resp.json()["output_ids"]) == 1, p_resp.text
        assert d_resp.status_code == 200 and len(d_resp.json()["output_ids"]) == 3, d_resp.text
        await _all_pages_back(client, prefill, decode)


async def test_prefill_killed_mid_request_is_a_clean_error_on_decode(
    pair: tuple[WorkerProcess, WorkerProcess],
) -> None:
    """Runs last (kills the module's prefill worker): the decode fails within the heartbeat
    window (0.2 s x 3) with a 5xx, never hangs, and frees its reserved pages."""
    prefill, decode = pair
    async with httpx.AsyncClient(timeout=30.0) as client:
        body = with_bootstrap(_native(8), prefill)
        task = asyncio.ensure_future(client.post(decode.url + "/generate", json=body))
        await _until(client, decode, "awaiting_kv_reqs", 1)
        await asyncio.sleep(0.3)  # registered with the prefill, which waits for its own leg
        t0 = time.monotonic()
        prefill.kill()
        resp = await asyncio.wait_for(task, 15.0)
        elapsed = time.monotonic() - t0
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["type"] == "kv_transfer_error"
        assert elapsed < 5.0
        await _all_pages_back(client, decode)
        # the decode still serves (locally) after losing its peer
        ok = await client.post(decode.url + "/generate", json=_native(2))
        assert ok.status_code == 200
