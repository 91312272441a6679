"""Dispatcher: dual dispatch, joined legs, retry decisions, commit semantics (scripted fake upstreams,
no sockets)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from pdserve.router.config import RouterConfig
from pdserve.router.dispatch import Dispatcher
from pdserve.router.errors import (
    PeerLegFailedError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policy import RoutingPolicy
from pdserve.router.prefix_index import key_from_ids
from pdserve.router.retry import counts_against_worker, failure_kind, is_retryable
from pdserve.router.workers import WorkerRegistry

pytestmark = pytest.mark.unit
RETRY = (408, 429, 500, 502, 503, 504)


def test_retry_decisions() -> None:
    assert is_retryable(UpstreamConnectError("x"), RETRY)
    assert is_retryable(UpstreamTimeoutError("x"), RETRY)
    for s in RETRY:
        assert is_retryable(UpstreamStatusError("x", status=s), RETRY)
    for s in (400, 404, 413, 422):
        assert not is_retryable(UpstreamStatusError("x", status=s), RETRY)
    peer = PeerLegFailedError("p")
    peer.__cause__ = UpstreamStatusError("x", status=400)
    assert not is_retryable(peer, RETRY)
    peer.__cause__ = UpstreamConnectError("x")
    assert is_retryable(peer, RETRY)
    assert counts_against_worker(UpstreamStatusError("x", status=500))
    assert counts_against_worker(UpstreamStatusError("x", status=408))
    assert not counts_against_worker(UpstreamStatusError("x", status=429))
    assert not counts_against_worker(UpstreamStatusError("x", status=400))
    assert not counts_against_worker(PeerLegFailedError("x"))
    assert failure_kind(UpstreamStatusError("x", status=503)) == "http_5xx"
    assert failure_kind(PeerLegFailedError("x")) == "peer"


class FakeResp:
    """Scripted response: ``script`` is (status, chunks, delay_s) or an exception to raise."""

    def __init__(self, addr: tuple[str, int], payload: bytes, script: Any) -> None:
        self.addr = addr
        self.body = orjson.loads(payload)
        self.script = script
        self.status = 0
        self.released = False
        self.aborted: BaseException | None = None
        self._abort_evt = asyncio.Event()
        self._chunks: list[bytes] = []

    async def _guard(self, coro: Any) -> Any:
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self._abort_evt.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            raise self.aborted  # type: ignore[misc]
        stopper.cancel()
        return task.result()

    async def wait_headers(self) -> None:
        if isinstance(self.script, BaseException):
            await self._guard(asyncio.sleep(0.01))
            self.released = True
            raise self.script
        status, chunks, delay = self.script
        await self._guard(asyncio.sleep(delay))
        self.status = status
        self._chunks = list(chunks)

    async def next_chunk(self) -> bytes | None:
        if self.aborted is not None:
            raise self.aborted
        if not self._chunks:
            self.released = True
            return None
        return self._chunks.pop(0)

    async def read(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks = []
        self.released = True
        return out

    def header(self, name: bytes) -> bytes | None:
        return None

    def abort(self, exc: BaseException | None = None) -> None:
        if not self.released:
            self.aborted = exc or UpstreamConnectError("aborted")
            self.released = True
            self._abort_evt.set()


class FakeClient:
    def __init__(self, scripts: dict[str, list[Any]]) -> None:
        self.scripts = scripts  # "host:port" -> scripts consumed in order
        self.sent: list[FakeResp] = []

    async def start(self, addr: tuple[str, int], method: bytes, path: bytes, payload: bytes) -> FakeResp:
        key = f"{addr[0]}:{addr[1]}"
        resp = FakeResp(addr, payload, self.scripts[key].pop(0))
        self.sent.append(resp)
        return resp


OK = (200, [b'data: {"text":"a"}\n\n', b"data: [DONE]\n\n"], 0.01)


def make(
    scripts: dict[str, list[Any]], np: int = 2, nd: int = 2, **retry: Any
) -> tuple[Dispatcher, FakeClient]:
    workers = [{"url": f"http://p{i}:1", "role": "prefill", "bootstrap_port": 9000 + i} for i in range(np)]
    workers += [{"url": f"http://d{i}:1", "role": "decode"} for i in range(nd)]
    cfg = RouterConfig.build(workers=workers, retry={"backoff_initial_s": 0.0, **retry},
                             policy={"prefill": "round_robin", "decode": "round_robin"})
    reg = WorkerRegistry(cfg)
    for spec in cfg.workers:
        reg.add(spec)
    client = FakeClient(scripts)
    disp = Dispatcher(cfg, reg, RoutingPolicy(cfg.policy, cfg.load, rng=random.Random(1)), client,  # type: ignore[arg-type]
                      RouterMetrics(CollectorRegistry()), rng=random.Random(2))
    return disp, client


async def test_both_legs_get_the_same_body_and_room() -> None:
    disp, client = make({"p0:1": [OK], "d0:1": [OK]})
    ex = await disp.open({"input_ids": [1, 2, 3]}, key_from_ids([1, 2, 3], 16), stream=True)
    assert ex.first == b'data: {"text":"a"}\n\n'
    assert await ex.next_chunk() == b"data: [DONE]\n\n" and await ex.next_chunk() is None
    ex.finish(ok=True)
    pre, dec = (r.body for r in sorted(client.sent, key=lambda r: r.addr[0]))
    assert dec == pre
    assert dec["bootstrap_host"] == "p0" and dec["bootstrap_port"] == 9000
    assert 0 <= dec["bootstrap_room"] < 2**63
    await asyncio.sleep(0.05)
    assert all(w.inflight_requests == 0 for w in disp.registry.all())


async def test_prefill_failure_aborts_decode_and_retries_on_a_new_pair_with_a_new_room() -> None:
    slow_ok = (200, [b"data: x\n\n"], 0.3)
    disp, client = make({"p0:1": [(500, [b'{"error":"boom"}'], 0.0)], "d0:1": [slow_ok],
                         "p1:1": [OK], "d1:1": [OK]})
    ex = await asyncio.wait_for(disp.open({"text": "hi"}, key_from_ids([1], 16), stream=True), 2.0)
    ex.finish(ok=True)
    first_decode = next(r for r in client.sent if r.addr[0] == "d0")
    assert isinstance(first_decode.aborted, PeerLegFailedError), "decode leg cancelled when prefill failed"
    rooms = [r.body["bootstrap_room"] for r in client.sent]
    assert len(set(rooms)) == 2, "a retry uses a new room"
    assert {r.addr[0] for r in client.sent} == {"p0", "d0", "p1", "d1"}, "a retry uses a new pair"
    assert disp.metrics.retries.labels("http_5xx")._value.get() == 1


async def test_decode_failure_cancels_prefill_leg() -> None:
    slow_prefill = (200, [b"{}"], 5.0)
    disp, client = make({"p0:1": [slow_prefill], "d0:1": [UpstreamConnectError("refused")]}, max_retries=0)
    with pytest.raises(UpstreamConnectError):
        await asyncio.wait_for(disp.open({"text": "hi"}, key_from_ids([1], 16), stream=False), 2.0)
    await asyncio.sleep(0.05)
    prefill = next(r for r in client.sent if r.addr[0] == "p0")
    assert prefill.aborted is not None, "prefill leg was cancelled"
    assert disp.registry.get("http://p0:1").inflight_requests == 0  # type: ignore[union-attr]
    assert disp.registry.get("http://p0:1").inflight_prefill_tokens == 0  # type: ignore[union-attr]


async def test_client_errors_are_not_retried_and_pass_through() -> None:
    bad = (400, [b'{"error":{"message":"bad sampling"}}'], 0.0)
    disp, client = make({"p0:1": [bad], "d0:1": [bad]})
    with pytest.raises(UpstreamStatusError) as info:
        await disp.open({"text": "hi"}, key_from_ids([1], 16), stream=False)
    assert info.value.status == 400 and b"bad sampling" in info.value.body
    assert len(client.sent) == 2
    assert disp.registry.get("http://d0:1").breaker.state.name == "CLOSED"  # type: ignore[union-attr]


async def test_retries_exhausted_returns_last_error() -> None:
    fail = (503, [b'{"error":"busy"}'], 0.0)
    disp, client = make({"p0:1": [OK, OK], "d0:1": [fail], "p1:1": [OK], "d1:1": [fail]}, max_retries=1)
    with pytest.raises(UpstreamStatusError) as info:
        await disp.open({"text": "hi"}, key_from_ids([1], 16), stream=True)
    assert info.value.status == 503
    assert sum(1 for r in client.sent if r.addr[0].startswith("d")) == 2


async def test_error_event_before_first_token_is_retried() -> None:
    err = (200, [b'data: {"error": {"message": "transfer failed"}}\n\n'], 0.0)
    disp, _ = make({"p0:1": [OK], "d0:1": [err], "p1:1": [OK], "d1:1": [OK]})
    ex = await disp.open({"text": "hi"}, key_from_ids([1], 16), stream=True)
    assert ex.route.target.url == "http://d1:1"
    ex.finish(ok=True)


async def test_local_mode_strips_bootstrap_fields() -> None:
    workers = [{"url": "http://d0:1", "role": "decode"}]
    cfg = RouterConfig.build(workers=workers, policy={"local_prefill_threshold": 100})
    reg = WorkerRegistry(cfg)
    reg.add(cfg.workers[0])
    client = FakeClient({"d0:1": [OK]})
    disp = Dispatcher(cfg, reg, RoutingPolicy(cfg.policy, cfg.load), client,  # type: ignore[arg-type]
                      RouterMetrics(CollectorRegistry()))
    body = {"input_ids": [1, 2], "bootstrap_host": "x", "bootstrap_port": 1, "bootstrap_room": 5}
    ex = await disp.open(body, key_from_ids([1, 2], 16), stream=True)
    assert ex.route.mode == "local"
    assert not {"bootstrap_host", "bootstrap_port", "bootstrap_room"} & set(client.sent[0].body)
    ex.finish(ok=True)


async def test_batched_bodies_get_lists_of_rooms() -> None:
    disp, client = make({"p0:1": [OK], "d0:1": [OK]})
    ex = await disp.open({"text": ["a", "b", "c"]}, key_from_ids([1], 16), stream=False, batch=3)
    ex.finish(ok=True)
    body = client.sent[0].body
    assert body["bootstrap_host"] == ["p0"] * 3 and len(set(body["bootstrap_room"])) == 3


async def test_input_logprobs_merged_from_prefill() -> None:
    pre_lp = {"input_token_logprobs": [[None, 1, None], [-0.5, 2, None]]}
    pre = (200, [orjson.dumps({"meta_info": pre_lp})], 0.0)
    dec_meta = {"output_token_logprobs": [[-1.0, 7, None]]}
    dec = (200, [orjson.dumps({"text": "x", "meta_info": dec_meta})], 0.02)
    disp, _ = make({"p0:1": [pre], "d0:1": [dec]})
    body = {"input_ids": [1, 2], "return_logprob": True}
    ex = await disp.open(body, key_from_ids([1, 2], 16), stream=False)
    merged = orjson.loads(ex.first)
    assert merged["meta_info"]["input_token_logprobs"][1] == [-0.5, 2, None]
    assert merged["meta_info"]["output_token_logprobs"] == [[-1.0, 7, None]]
    ex.finish(ok=True)


def test_backoff_bounds() -> None:
    disp, _ = make({}, backoff_initial_s=0.1, backoff_max_s=0.3, jitter=0.2)
    for attempt in range(1, 6):
        b = disp._backoff(attempt)
        base = min(0.3, 0.1 * 2 ** (attempt - 1))
        assert base * 0.8 - 1e-9 <= b <= base * 1.2 + 1e-9
