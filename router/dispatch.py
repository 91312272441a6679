"""PD dispatch: one client request becomes a prefill leg and a decode leg, with retries.

Lifecycle of ``Dispatcher.open`` (one request):

1. Route (router/policy.py): a (prefill, decode) pair, or a decode/colocated worker alone.
2. In PD mode draw a fresh ``bootstrap_room`` in [0, 2**63-1], add ``bootstrap_host``,
   ``bootstrap_port``, ``bootstrap_room`` to the body and send it to BOTH workers concurrently
   (the prefill leg in a background task, the decode leg in the caller's task).
3. Joined legs: if the prefill leg fails before the decode leg is committed, the decode leg is
   aborted (its connection closed, so the worker aborts and frees its pages); if the decode leg
   fails, the prefill task is cancelled the same way.
4. Commit: the decode leg's response is committed once it has a 2xx status and its first body
   chunk (streamed) or whole body (not streamed). Before commit, failures with a retryable status
   (408/429/500/502/503/504), connection errors and timeouts are retried on a NEW pair (failed
   workers excluded) with a NEW room, after a jittered exponential backoff.
5. After commit the caller reads the rest of the stream (``Exchange.next_chunk``) and ends with
   ``finish()`` or ``abort()``; either settles breakers and in-flight accounting exactly once. A
   prefill leg still running after the decode leg ended gets ``prefill_drain_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import orjson

from pdserve.errors import PdserveError
from pdserve.router.config import RouterConfig
from pdserve.router.errors import (
    NoWorkerError,
    PeerLegFailedError,
    UpstreamConnectError,
    UpstreamStatusError,
)
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policy import Route, RoutingPolicy
from pdserve.router.prefix_index import PromptKey
from pdserve.router.retry import counts_against_worker, failure_kind, is_retryable
from pdserve.router.upstream import HttpClient, UpstreamResponse
from pdserve.router.workers import Worker, WorkerRegistry

logger = logging.getLogger(__name__)

BOOTSTRAP_KEYS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
_ERROR_PREFIXES = (b'data: {"error"', b'{"error"')


class _Pair:
    """Shared state of the two legs of one attempt."""

    __slots__ = ("committed", "decode", "prefill_body", "prefill_error")

    def __init__(self) -> None:
        self.decode: UpstreamResponse | None = None
        self.committed = False
        self.prefill_error: BaseException | None = None
        self.prefill_body: bytes | None = None


class Exchange:
    """A committed decode response: ``first`` holds the first chunk (or the whole body)."""

    __slots__ = (
        "_dispatcher", "_pair", "_prefill_task", "_settled", "first", "resp", "route", "started",
        "status", "stream",
    )

    def __init__(
        self, dispatcher: Dispatcher, route: Route, resp: UpstreamResponse, first: bytes, stream: bool,
        pair: _Pair, prefill_task: asyncio.Task[None] | None, started: float,
    ) -> None:
        self._dispatcher = dispatcher
        self.route = route
        self.resp = resp
        self.first = first
        self.stream = stream
        self.status = resp.status
        self._pair = pair
        self._prefill_task = prefill_task
        self._settled = False
        self.started = started

    @property
    def content_type(self) -> bytes:
        default = b"text/event-stream" if self.stream else b"application/json"
        return self.resp.header(b"content-type") or default

    async def next_chunk(self) -> bytes | None:
        """The next streamed bytes; None at the end. Errors here are after commit (no retry)."""
        if not self.stream:
            return None
        return await self.resp.next_chunk()

    def finish(self, ok: bool = True, error: BaseException | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        target = self.route.target
        if ok:
            target.breaker.record_success()
        elif error is not None and counts_against_worker(error):
            target.breaker.record_failure()
        else:
            target.breaker.record_cancelled()
        if not self.resp.released:
            if ok:
                self._dispatcher._drain_decode(self.resp)
            else:
                self.resp.abort()
        target.inflight_requests -= 1
        self._dispatcher._drain_prefill(self._prefill_task)

    def abort(self, cause: str = "client") -> None:
        """The client went away: close the decode leg and cancel a still-running prefill leg."""
        if self._settled:
            return
        metrics = self._dispatcher.metrics
        metrics.cancelled_legs.labels("decode", cause).inc()
        task = self._prefill_task
        if task is not None and not task.done():
            metrics.cancelled_legs.labels("prefill", cause).inc()
            task.cancel()
        self.finish(ok=False)


class Dispatcher:
    def __init__(
        self,
        cfg: RouterConfig,
        registry: WorkerRegistry,
        policy: RoutingPolicy,
        client: HttpClient,
        metrics: RouterMetrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.policy = policy
        self.client = client
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._bg: set[asyncio.Task[None]] = set()

    # ---- public ------------------------------------------------------------------------------
    async def open(
        self, body: dict[str, Any], key: PromptKey, *, stream: bool, path: bytes = b"/generate",
        batch: int | None = None,
    ) -> Exchange:
        """Route and dispatch with retries until the decode response is committed."""
        retry = self.cfg.retry
        exclude: set[str] = set()
        last: PdserveError | None = None
        started = time.monotonic()
        attempt = 0
        while True:
            if attempt:
                await asyncio.sleep(self._backoff(attempt))
            try:
                route = self.policy.route(self.registry, key, exclude)
            except NoWorkerError:
                if last is not None:
                    cause = last.__cause__
                    if isinstance(last, PeerLegFailedError) and isinstance(cause, PdserveError):
                        raise cause from None
                    raise last from None
                raise
            try:
                return await self._attempt(route, body, key, stream, path, batch, started)
            except PdserveError as exc:
                failed = _failed_worker(route, exc)
                if not is_retryable(exc, retry.statuses) or attempt >= retry.max_retries:
                    cause = exc.__cause__
                    if isinstance(exc, PeerLegFailedError) and isinstance(cause, PdserveError):
                        raise cause from None  # the client sees what the failing leg said
                    raise
                exclude.add(failed.url)
                last = exc
                attempt += 1
                kind = failure_kind(exc, root=True)
                self.metrics.retries.labels(kind).inc()
                logger.info("retry %d after %s from %s: %s", attempt, kind, failed.url, exc)

    async def aclose(self) -> None:
        for task in list(self._bg):
            task.cancel()
        if self._bg:
            await asyncio.wait(self._bg, timeout=self.cfg.timeouts.prefill_drain_s)

    # ---- internals ---------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        r = self.cfg.retry
        base = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_multiplier ** (attempt - 1))
        return max(0.0, base * (1.0 + r.jitter * (2.0 * self.rng.random() - 1.0)))

    def _prepare(self, route: Route, body: dict[str, Any], batch: int | None) -> bytes:
        pf = route.prefill
        if pf is None:
            for k in BOOTSTRAP_KEYS:
                body.pop(k, None)
        elif batch is None:
            body["bootstrap_host"] = pf.bootstrap_host
            body["bootstrap_port"] = pf.bootstrap_port
            body["bootstrap_room"] = self.rng.getrandbits(63)
        else:
            body["bootstrap_host"] = [pf.bootstrap_host] * batch
            body["bootstrap_port"] = [pf.bootstrap_port] * batch
            body["bootstrap_room"] = [self.rng.getrandbits(63) for _ in range(batch)]
        return orjson.dumps(body)

    async def _attempt(
        self, route: Route, body: dict[str, Any], key: PromptKey, stream: bool, path: bytes,
        batch: int | None, started: float,
    ) -> Exchange:
        target, pf = route.target, route.prefill
        payload = self._prepare(route, body, batch)
        self.metrics.decision(route.mode, route.num_tokens, route.matched_tokens)
        if key.hashes:
            target.index.insert(key.hashes)
            if pf is not None:
                pf.index.insert(key.hashes)
        target.inflight_requests += 1
        target.breaker.on_dispatch()
        pair = _Pair()
        task: asyncio.Task[None] | None = None
        if pf is not None:
            want_body = not stream and bool(body.get("return_logprob"))
            leg = self._prefill_leg(pf, path, payload, pair, route.uncached_tokens, want_body)
            task = asyncio.create_task(leg)
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)
        resp: UpstreamResponse | None = None
        try:
            resp = await self.client.start(target.addr, b"POST", path, payload)
            pair.decode = resp
            if pair.prefill_error is not None:
                resp.abort(_peer_error(pair.prefill_error))
            await resp.wait_headers()
            if resp.status >= 300:
                err_body = await resp.read()
                raise UpstreamStatusError(
                    f"{target.role} worker {target.url} answered {resp.status}",
                    status=resp.status, body=err_body,
                )
            if stream:
                first = await resp.next_chunk()
                if first is None or first.startswith(_ERROR_PREFIXES):
                    raise UpstreamStatusError(
                        f"{target.role} worker {target.url} failed before its first token",
                        status=502 if first is None else 500, body=first or b"",
                    )
            else:
                first = await resp.read()
                if task is not None and want_body:
                    first = await self._merge_input_logprobs(first, task, pair)
            pair.committed = True
            return Exchange(self, route, resp, first, stream, pair, task, started)
        except BaseException as exc:
            if resp is not None and not resp.released:
                resp.abort()
            target.inflight_requests -= 1
            if isinstance(exc, PeerLegFailedError) or not isinstance(exc, PdserveError):
                target.breaker.record_cancelled()
            elif counts_against_worker(exc):
                target.breaker.record_failure()
                self.metrics.leg_failures.labels(_leg(target), failure_kind(exc)).inc()
            else:
                target.breaker.record_cancelled()
            if task is not None and not task.done():
                cause = "client" if isinstance(exc, asyncio.CancelledError) else "peer"
                self.metrics.cancelled_legs.labels("prefill", cause).inc()
                task.cancel()
            if isinstance(exc, PeerLegFailedError):
                self.metrics.cancelled_legs.labels("decode", "peer").inc()
            if isinstance(exc, Exception) and not isinstance(exc, PdserveError):
                raise UpstreamConnectError(f"request to {target.url} failed: {exc!r}") from exc
            raise

    async def _prefill_leg(
        self, pf: Worker, path: bytes, payload: bytes, pair: _Pair, tokens: int, want_body: bool,
    ) -> None:
        pf.inflight_requests += 1
        pf.inflight_prefill_tokens += tokens
        pf.breaker.on_dispatch()
        resp: UpstreamResponse | None = None
        verdict: bool | None = None
        try:
            resp = await self.client.start(pf.addr, b"POST", path, payload)
            await resp.wait_headers()
            data = await resp.read()
            if resp.status >= 300:
                raise UpstreamStatusError(
                    f"prefill worker {pf.url} answered {resp.status}", status=resp.status, body=data,
                )
            if want_body:
                pair.prefill_body = data
            verdict = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = exc if isinstance(exc, PdserveError) else UpstreamConnectError(f"prefill leg failed: {exc}")
            verdict = False if counts_against_worker(err) else None
            self.metrics.leg_failures.labels("prefill", failure_kind(err)).inc()
            pair.prefill_error = err
            if pair.decode is not None and not pair.committed:
                pair.decode.abort(_peer_error(err))
            elif pair.committed:
                logger.warning("prefill leg on %s failed after the decode leg committed: %s", pf.url, err)
        finally:
            if resp is not None and not resp.released:
                resp.abort()
            pf.inflight_requests -= 1
            pf.inflight_prefill_tokens -= tokens
            if verdict is True:
                pf.breaker.record_success()
            elif verdict is False:
                pf.breaker.record_failure()
            else:
                pf.breaker.record_cancelled()

    async def _merge_input_logprobs(self, decode_body: bytes, task: asyncio.Task[None], pair: _Pair) -> bytes:
        """Non-streamed PD responses with ``return_logprob``: the prompt logprobs were computed by
        the prefill worker; copy them into the decode worker's ``meta_info``."""
        try:
            await asyncio.wait_for(asyncio.shield(task), self.cfg.timeouts.prefill_drain_s)
        except (TimeoutError, asyncio.CancelledError):
            return decode_body
        if pair.prefill_body is None:
            return decode_body
        try:
            dec, pre = orjson.loads(decode_body), orjson.loads(pair.prefill_body)
        except orjson.JSONDecodeError:
            return decode_body
        both_lists = isinstance(dec, list) and isinstance(pre, list)
        pairs = zip(dec, pre, strict=False) if both_lists else [(dec, pre)]
        for d, p in pairs:
            if isinstance(d, dict) and isinstance(p, dict):
                dm, pm = d.get("meta_info"), p.get("meta_info")
                if isinstance(dm, dict) and isinstance(pm, dict):
                    for k in ("input_token_logprobs", "input_top_logprobs"):
                        if pm.get(k):
                            dm[k] = pm[k]
        return orjson.dumps(dec)

    def _drain_decode(self, resp: UpstreamResponse) -> None:
        """The caller has what it needs (final event seen) but the body has not ended (e.g. the
        ``[DONE]`` line is still in flight): read it to the end in the background, briefly, so the
        keep-alive connection goes back to the pool instead of being closed."""

        async def drain() -> None:
            try:
                async with asyncio.timeout(1.0):
                    while await resp.next_chunk() is not None:
                        pass
            except (TimeoutError, PdserveError):
                resp.abort()

        task = asyncio.create_task(drain())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _drain_prefill(self, task: asyncio.Task[None] | None) -> None:
        if task is not None and not task.done():
            handle = asyncio.get_running_loop().call_later(self.cfg.timeouts.prefill_drain_s, task.cancel)
            task.add_done_callback(lambda _t: handle.cancel())


def _peer_error(cause: BaseException) -> PeerLegFailedError:
    err = PeerLegFailedError(f"prefill leg failed: {cause}")
    err.__cause__ = cause
    return err


def _leg(w: Worker) -> str:
    return "decode" if w.role == "decode" else "colocated" if w.role == "both" else "prefill"


def _failed_worker(route: Route, exc: BaseException) -> Worker:
    if isinstance(exc, PeerLegFailedError) and route.prefill is not None:
        return route.prefill
    return route.target
