"""Router failure handling with fake worker processes on 127.0.0.1: retry on a new pair with a new room,
circuit breaker, health checks, a worker killed mid-stream, dynamic registration, colocated workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from pdserve.router.bench_util import free_port
from pdserve.router.testing import FakeWorkerProcess, running_router, start_workers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FakeWorkerProcess]]:
    d = tmp_path_factory.mktemp("router-failover")
    workers = start_workers(["prefill", "prefill", "decode", "both"], d, d)
    yield workers
    for w in workers:
        w.close()


@pytest.fixture
async def workers(fleet: list[FakeWorkerProcess]) -> AsyncIterator[list[FakeWorkerProcess]]:
    for w in fleet:
        await w.reset()
    yield fleet


BODY = {"input_ids": [3, 1, 4, 1, 5], "sampling_params": {"max_new_tokens": 3}}


async def test_retry_uses_a_new_pair_and_a_new_room(workers: list[FakeWorkerProcess]) -> None:
    p0, p1, d, _ = workers
    await p0.configure(fail_next=1, fail_status=503)
    await d.configure(prefill_delay_s=0.2)
    async with running_router(workers=[p0, p1, d], policy={"prefill": "round_robin"}) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        res = await c.post("/generate", json=BODY)
        assert res.status_code == 200, res.text
        assert f"prefill={p1.url}" in res.headers["x-pdserve-route"]
        metrics = (await c.get("/metrics")).text
    s0, s1, sd = await p0.stats(), await p1.stats(), await d.wait_stats(ended=1)
    assert s0["injected_failures"] == 1 and s1["completed"] == 1
    assert len(sd["rooms"]) == 2 and sd["rooms"][0] != sd["rooms"][1], "the retry drew a new room"
    assert s1["rooms"] == [sd["rooms"][1]]
    assert 'pdserve:router_retries_total{reason="http_5xx"} 1.0' in metrics


async def test_breaker_opens_then_half_opens_and_closes(workers: list[FakeWorkerProcess]) -> None:
    p0, _, d, _ = workers
    await d.configure(fail_next=100, fail_status=500)
    breaker = {"failure_threshold": 2, "success_threshold": 1, "open_timeout_s": 0.5}
    async with running_router(workers=[p0, d], retry={"max_retries": 0}, health={"enabled": False},
                              breaker=breaker) as r, httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        for _ in range(2):
            assert (await c.post("/generate", json=BODY)).status_code == 500
        t0 = time.monotonic()
        res = await c.post("/generate", json=BODY)
        assert res.status_code == 503 and "no healthy decode" in res.text
        assert time.monotonic() - t0 < 0.5, "an open breaker fails fast"
        assert (await d.stats())["requests"] == 2, "the open breaker kept traffic away"
        metrics = (await c.get("/metrics")).text
        assert f'pdserve:router_worker_breaker_state{{role="decode",worker="{d.url}"}} 1.0' in metrics
        await d.configure(fail_next=0)
        await asyncio.sleep(0.6)
        assert (await c.post("/generate", json=BODY)).status_code == 200  # the half-open trial
        workers_info = (await c.get("/workers")).json()["workers"]
        assert next(w for w in workers_info if w["url"] == d.url)["breaker"] == "closed"


async def test_health_checks_remove_and_restore(workers: list[FakeWorkerProcess]) -> None:
    p0, _, d, _ = workers
    async with running_router(workers=[p0, d], health={"interval_s": 0.1, "failure_threshold": 2,
                                                        "success_threshold": 2}) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        await d.configure(healthy=False)
        await _until(lambda: not r.app.state.workers.get(d.url).healthy)  # type: ignore[union-attr]
        res = await c.post("/generate", json=BODY)
        assert res.status_code == 503
        metrics = (await c.get("/metrics")).text
        assert f'pdserve:router_worker_healthy{{role="decode",worker="{d.url}"}} 0.0' in metrics
        await d.configure(healthy=True)
        await _until(lambda: r.app.state.workers.get(d.url).healthy)  # type: ignore[union-attr]
        assert (await c.post("/generate", json=BODY)).status_code == 200


async def test_dynamic_registration(workers: list[FakeWorkerProcess]) -> None:
    p0, _, d, both = workers
    async with running_router() as r, httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        assert (await c.post("/generate", json=BODY)).status_code == 503
        res = await c.post("/workers", json={"url": p0.url, "role": "prefill",
                                             "bootstrap_port": p0.bootstrap_port})
        assert res.status_code == 200 and res.json()["healthy"]
        res = await c.post("/workers", json={"url": d.url, "worker_type": "decode"})  # smg's field name
        assert res.status_code == 200
        assert (await c.post("/workers", json={"url": d.url, "role": "decode"})).status_code == 409
        assert (await c.post("/workers", json={"url": d.url, "role": "king"})).status_code == 400
        assert (await c.post("/workers", json={"url": "ftp://x:1", "role": "decode"})).status_code == 400
        assert (await c.post("/workers", content=b"nope")).status_code == 400
        listed = {w["url"]: w["role"] for w in (await c.get("/workers")).json()["workers"]}
        assert listed == {p0.url: "prefill", d.url: "decode"}
        res = await c.post("/generate", json=BODY)
        assert res.status_code == 200 and res.headers["x-pdserve-route"].startswith("pd ")
        assert (await c.request("DELETE", "/workers", json={"url": d.url})).status_code == 200
        assert (await c.post("/generate", json=BODY)).status_code == 503
        assert (await c.post("/workers", json={"url": both.url, "role": "both"})).status_code == 200
        res = await c.post("/generate", json=BODY)
        assert res.status_code == 200 and res.headers["x-pdserve-route"].startswith("colocated ")
        dead = await c.post("/workers", json={"url": "http://127.0.0.1:9", "role": "decode"})
        assert dead.status_code == 200 and not dead.json()["healthy"], "registered but not routable"
        metrics = (await c.get("/metrics")).text
    assert 'pdserve:router_workers{role="decode"} 1.0' in metrics
    assert (await both.stats())["local_prefill"] == 1


async def test_colocated_and_pd_mixed(workers: list[FakeWorkerProcess]) -> None:
    p0, _, d, both = workers
    await d.configure(token_delay_s=0.05)
    async with running_router(workers=[p0, d, both], load={"enabled": False}) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        res = await asyncio.gather(*(c.post("/generate", json={**BODY, "stream": True}) for _ in range(6)))
    modes = [x.headers["x-pdserve-route"].split()[0] for x in res]
    assert all(x.status_code == 200 for x in res)
    assert {"pd", "colocated"} <= set(modes), f"both pools should take traffic: {modes}"


async def test_worker_killed_mid_stream_gives_a_clean_error(workers: list[FakeWorkerProcess],
                                                            tmp_path: Path) -> None:
    prefill = workers[0]
    (decode,) = start_workers(["decode"], tmp_path, tmp_path)
    try:
        await decode.configure(token_delay_s=0.1)
        async with running_router(workers=[prefill, decode]) as r, \
                httpx.AsyncClient(base_url=r.url, timeout=10) as c:
            t0 = time.monotonic()
            async with c.stream("POST", "/generate", json={**BODY, "stream": True,
                                                         "sampling_params": {"max_new_tokens": 50}}) as res:
                assert res.status_code == 200
                got = b""
                async for chunk in res.aiter_bytes():
                    if not got:
                        decode.kill()
                    got += chunk
            assert time.monotonic() - t0 < 5, "no hang"
            events = [e[6:] for e in got.split(b"\n") if e.startswith(b"data: ")]
            assert events[-1] == b"[DONE]"
            err = orjson.loads(events[-2])
            assert err["error"]["code"] == 502 and "lost" in err["error"]["message"]
            res2 = await c.post("/generate", json=BODY)
            assert res2.status_code in (502, 503)
            assert res2.json()["error"]["code"] in (502, 503)
    finally:
        decode.close()


async def test_dead_decode_worker_before_first_token_is_retried(workers: list[FakeWorkerProcess]) -> None:
    p0, _, d, _ = workers
    dead = {"url": f"http://127.0.0.1:{free_port()}", "role": "decode"}  # a killed worker: port closed
    async with running_router(workers=[p0, d], health={"enabled": False},
                              policy={"decode": "round_robin"}) as r, \
            httpx.AsyncClient(base_url=r.url, timeout=10) as c:
        await c.post("/workers", json=dead)  # (no health check: routable until it fails)
        for _ in range(2):  # one of the two goes to the dead worker first and is retried
            res = await c.post("/generate", json=BODY)
            assert res.status_code == 200 and d.url in res.headers["x-pdserve-route"]
        metrics = (await c.get("/metrics")).text
    assert 'pdserve:router_retries_total{reason="connect"} 1.0' in metrics


async def _until(cond: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
