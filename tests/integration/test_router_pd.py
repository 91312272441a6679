"""Router + fake prefill/decode worker processes on 127.0.0.1: PD round trips (JSON and SSE), joined
legs (a failed leg cancels the other), client disconnects, conditional disaggregation, 4xx cases."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from pdserve.router.bench_util import free_port, spawn, stop
from pdserve.router.testing import FakeWorkerProcess, running_router, start_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeWorkerProcess, FakeWorkerProcess]]:
    d = tmp_path_factory.mktemp("router-pd")
    workers = start_workers(["prefill", "decode"], d, d)
    yield workers[0], workers[1]
    for w in workers:
        w.close()


@pytest.fixture
async def pd(
    pair: tuple[FakeWorkerProcess, FakeWorkerProcess]
) -> AsyncIterator[tuple[FakeWorkerProcess, ...]]:
    for w in pair:
        await w.reset()
    yield pair


def body(n: int = 4, stream: bool = False, ids: list[int] | None = None, **kw: object) -> dict[str, object]:
    sp = {"max_new_tokens": n}
    return {"input_ids": ids or [5, 6, 7, 8], "sampling_params": sp, "stream": stream, **kw}


def sse_events(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


async def test_pd_round_trip_json_and_sse(pd: tuple[FakeWorkerProcess, ...]) -> None:
    prefill, decode = pd
    async with running_router(workers=pd) as r, httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        res = await c.post("/generate", json=body(5))
        assert res.status_code == 200, res.text
        out = res.json()
        assert len(out["output_ids"]) == 5 and out["meta_info"]["finish_reason"]["type"] == "length"
        assert res.headers["x-pdserve-route"].startswith("pd ")
        res = await c.post("/generate", json=body(3, stream=True))
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        events = sse_events(res.content)
        assert events[-1] == b"[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert [len(ch["output_ids"]) for ch in chunks] == [1, 2, 3]
        assert chunks[-1]["output_ids"] == out["output_ids"][:3], "same prompt -> same tokens"
        two = {"max_new_tokens": 2}
        text_res = await c.post("/generate", json={"text": "hello there", "sampling_params": two})
        assert text_res.status_code == 200 and len(text_res.json()["output_ids"]) == 2
        batch = await c.post("/generate", json={"text": ["a", "b"], "sampling_params": two})
        assert batch.status_code == 200 and len(batch.json()) == 2
        metrics = (await c.get("/metrics")).text
        await asyncio.sleep(0.3)  # at least one load poll (every 0.2 s here)
        listed = (await c.get("/workers")).json()["workers"]
        assert all(w["load"]["total_kv_blocks"] == 4096 and w["load"]["age_s"] is not None for w in listed)
    ps, ds = await prefill.stats(), await decode.stats()
    assert ps["completed"] == ds["completed"] == 4
    assert ps["rooms"] == ds["rooms"], "both legs of every request used the same room"
    assert len(set(ds["rooms"])) == 4 and all(0 <= x < 2**63 for x in ds["rooms"])
    assert ps["open_rooms"] == 0
    assert 'pdserve:router_requests_total{outcome="success",route="generate"} 4.0' in metrics
    assert 'pdserve:router_routing_decisions_total{mode="pd"} 4.0' in metrics
    assert "pdserve:router_ttft_seconds_bucket" in metrics


async def test_logprobs_from_prefill_are_merged(pd: tuple[FakeWorkerProcess, ...]) -> None:
    async with running_router(workers=pd) as r, httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        res = await c.post("/generate", json=body(2, return_logprob=True))
    meta = res.json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 2
    assert len(meta["input_token_logprobs"]) == 4, "prompt logprobs come from the prefill leg"


async def test_prefill_failure_cancels_the_decode_leg(pd: tuple[FakeWorkerProcess, ...]) -> None:
    prefill, decode = pd
    await prefill.configure(fail_next=1, fail_status=500)
    await decode.configure(prefill_delay_s=0.3)  # keep the decode leg in flight when prefill fails
    async with running_router(workers=pd, retry={"max_retries": 0}) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        res = await c.post("/generate", json=body(stream=True))
        assert res.status_code == 500 and "injected failure" in res.text
    st = await decode.wait_stats(aborted=1)
    assert st["completed"] == 0 and st["active"] == 0


async def test_decode_failure_cancels_the_prefill_leg(pd: tuple[FakeWorkerProcess, ...]) -> None:
    prefill, decode = pd
    await decode.configure(fail_next=1, fail_status=503)
    async with running_router(workers=pd, retry={"max_retries": 0}) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        res = await c.post("/generate", json=body())
        assert res.status_code == 503
    st = await prefill.wait_stats(ended=1)
    assert st["completed"] == 0 and st["open_rooms"] == 0


@pytest.mark.parametrize("when", ["before_first_token", "mid_stream"])
async def test_client_disconnect_cancels_both_legs(pd: tuple[FakeWorkerProcess, ...], when: str) -> None:
    prefill, decode = pd
    if when == "before_first_token":
        await prefill.configure(prefill_delay_s=5.0)
    else:
        await decode.configure(token_delay_s=0.2)
    async with running_router(workers=pd) as r:
        async with httpx.AsyncClient(base_url=r.url, timeout=10) as c:
            if when == "before_first_token":
                with pytest.raises(httpx.ReadTimeout):
                    await c.post("/generate", json=body(20, stream=True), timeout=0.5)
            else:
                async with c.stream("POST", "/generate", json=body(20, stream=True)) as res:
                    async for _ in res.aiter_bytes():
                        break  # got the first token; hang up
        if when == "before_first_token":
            await prefill.wait_stats(ended=1)
            await decode.wait_stats(ended=1)
        else:
            st = await decode.wait_stats(aborted=1)
            assert st["completed"] == 0
        await asyncio.sleep(0.1)
        assert all(w.inflight_requests == 0 for w in r.app.state.workers.all())  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=r.url, timeout=10) as c:
            metrics = (await c.get("/metrics")).text
        assert 'pdserve:router_requests_total{outcome="cancelled",route="generate"} 1.0' in metrics


async def test_conditional_disaggregation(pd: tuple[FakeWorkerProcess, ...]) -> None:
    prefill, decode = pd
    long_ids = list(range(1, 301))
    async with running_router(workers=pd, policy={"local_prefill_threshold": 64}) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        short = await c.post("/generate", json=body(2))
        assert short.status_code == 200 and short.headers["x-pdserve-route"].startswith("local ")
        first = await c.post("/generate", json=body(2, ids=long_ids))
        assert first.headers["x-pdserve-route"].startswith("pd ")
        again = await c.post("/generate", json=body(2, ids=long_ids))
        assert again.headers["x-pdserve-route"].startswith("local "), "cached on the decode worker now"
        assert again.json()["output_ids"] == first.json()["output_ids"]
        metrics = (await c.get("/metrics")).text
    assert (await prefill.stats())["completed"] == 1
    assert (await decode.stats())["local_prefill"] == 2
    assert 'pdserve:router_routing_decisions_total{mode="local"} 2.0' in metrics
    assert 'pdserve:router_prefix_cache_lookups_total{result="hit"} 1.0' in metrics


async def test_bad_input_is_4xx(pd: tuple[FakeWorkerProcess, ...]) -> None:
    async with running_router(workers=pd, max_body_bytes=4096) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        cases = [
            (b"{not json", 400), (b"[1, 2]", 400), (b'{"sampling_params": {}}', 400),
            (b'{"input_ids": []}', 400), (b'{"input_ids": "abc"}', 400), (b'{"text": 5}', 400),
            (orjson.dumps({"text": "x" * 10_000}), 413),
        ]
        for raw, status in cases:
            res = await c.post("/generate", content=raw, headers={"content-type": "application/json"})
            assert res.status_code == status, (raw[:30], res.text)
            assert res.json()["error"]["code"] == status
        async def parts() -> AsyncIterator[bytes]:
            for p in (b'{"text": "', b"y" * 5000, b'"}'):
                yield p

        chunked = await c.post("/generate", content=parts())
        assert chunked.status_code == 413
        big = await c.post("/v1/chat/completions", content=b"x" * 5000)
        assert big.status_code == 413
        # a worker's own 4xx (bad sampling value) passes through unchanged, and is not retried
        bad = {"input_ids": [1], "sampling_params": {"max_new_tokens": "many"}}
        res = await c.post("/generate", json=bad)
        assert res.status_code == 400 and "max_new_tokens" in res.json()["error"]["message"]
        gone = await c.delete("/workers", params={"url": "http://127.0.0.1:1"})
        assert gone.status_code == 404
        metrics = (await c.get("/metrics")).text
    assert 'pdserve:router_requests_total{outcome="client_error",route="generate"}' in metrics


async def test_cli_router_process(pd: tuple[FakeWorkerProcess, ...], tmp_path: Path) -> None:
    """``pdserve router`` in sglang-router's shape, as a real process."""
    prefill, decode = pd
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--prefill", prefill.url,
           str(prefill.bootstrap_port), "--decode", decode.url, "--host", "127.0.0.1", "--port", str(port),
           "--health-interval", "0.5"]
    log = tmp_path / "router.log"
    proc = spawn(cmd, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if (await c.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "router did not start"
                await asyncio.sleep(0.1)
            res = await c.post("/generate", json=body(3, stream=True))
            assert res.status_code == 200 and sse_events(res.content)[-1] == b"[DONE]"
            assert (await c.get("/readiness")).json() == {"ready": True}
    finally:
        stop(proc)


async def test_admission_limit_is_429(pd: tuple[FakeWorkerProcess, ...]) -> None:
    _, decode = pd
    await decode.configure(token_delay_s=0.1)
    async with running_router(workers=pd, max_inflight_requests=1) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        slow, fast = await asyncio.gather(c.post("/generate", json=body(5, stream=True)),
                                          _later(c.post("/generate", json=body(1))))
        assert slow.status_code == 200
        assert fast.status_code == 429 and fast.json()["error"]["type"] == "rate_limit_error"
        assert (await c.post("/generate", json=body(1))).status_code == 200


async def _later(coro: Awaitable[httpx.Response]) -> httpx.Response:
    await asyncio.sleep(0.15)
    return await coro


async def test_no_workers_is_503_not_a_hang(tmp_path: Path) -> None:
    async with running_router() as r, httpx.AsyncClient(base_url=r.url, timeout=5) as c:
        res = await c.post("/generate", json=body())
        assert res.status_code == 503 and res.json()["error"]["type"] == "overloaded_error"
        assert (await c.get("/readiness")).status_code == 503
        assert (await c.get("/health")).status_code == 200
