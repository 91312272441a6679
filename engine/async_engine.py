"""asyncio front of the engine: one background thread owns the :class:`LLMEngine`.

Lifecycle:

1. ``AsyncLLMEngine(engine)`` starts the engine thread. The thread is the only one that touches
   the engine: every call (``generate``'s add, ``abort``, ``reserve``, ``adopt``, ``release``) is
   a command queued under a condition variable and executed by the thread between two steps; its
   result or exception comes back through a future that the caller awaits with a timeout.
2. The thread loop: run queued commands; if the engine has work, ``step()`` and route each
   delta to its request's ``asyncio.Queue`` on the caller's event loop (one
   ``call_soon_threadsafe`` per loop per step); otherwise sleep on the condition (no busy spin;
   the wait has a timeout, so a lost wake-up costs at most ``idle_wait_s``).
3. A failing step (:class:`EngineStepError`) fails exactly the requests that were in it: they are
   aborted (blocks freed) and the exception is raised to their consumers; an unexpected error
   fails every request. The loop keeps running either way and logs the error.
4. Consumers: leaving a ``generate`` stream early (``break``, ``aclose()``, task cancellation)
   aborts the request and frees its blocks. A command that times out is cancelled if it has not
   run yet; if it already ran, its effect is undone (a reservation released, a request aborted).
5. ``shutdown(timeout_s)`` stops the thread, aborts everything still in the engine and fails
   every waiting consumer with :class:`AbortedError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.engine.llm_engine import EngineLoad, EngineStepError, LLMEngine, PrefillOutput, PrefillResult
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import AbortedError, PdserveError, RequestTimeoutError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Item = RequestOutput | BaseException


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Item]


@dataclass(eq=False)
class _Command:
    fn: Callable[[LLMEngine], Any]
    future: cf.Future[Any]


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Gauge(
            "pdserve:engine_requests", "Requests in the engine by state", ["state"], registry=registry
        )
        self.blocks = Gauge("pdserve:engine_kv_blocks", "KV blocks by state", ["state"], registry=registry)
        self.steps = Counter("pdserve:engine_steps_total", "Engine steps run", registry=registry)
        self.step_errors = Counter(
            "pdserve:engine_step_errors_total", "Engine steps that failed", registry=registry
        )
        self.tokens = Counter("pdserve:engine_generated_tokens_total", "Tokens sampled", registry=registry)
        self.preemptions = Counter(
            "pdserve:engine_preemptions_total", "Sequences preempted for recompute", registry=registry
        )
        self.step_seconds = Histogram(
            "pdserve:engine_step_duration_seconds",
            "Wall time of one engine step",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self._preemptions_seen = 0

    def observe_load(self, load: EngineLoad) -> None:
        for state, n in (
            ("running", load.num_running),
            ("waiting", load.num_waiting),
            ("held", load.num_held),
            ("reserved", load.num_reserved),
        ):
            self.requests.labels(state).set(n)
        self.blocks.labels("free").set(load.free_blocks - load.cached_blocks)
        self.blocks.labels("cached").set(load.cached_blocks)
        self.blocks.labels("used").set(load.total_blocks - load.free_blocks)
        if load.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(load.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = load.num_preemptions


class AsyncLLMEngine:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        registry: CollectorRegistry | None = None,
        call_timeout_s: float = 30.0,
        idle_wait_s: float = 1.0,
    ) -> None:
        if call_timeout_s <= 0 or idle_wait_s <= 0:
            raise PdserveError("call_timeout_s and idle_wait_s must be positive")
        self.engine = engine
        self.call_timeout_s = call_timeout_s
        self._idle_wait_s = idle_wait_s
        self._cond = threading.Condition()
        self._commands: deque[_Command] = deque()
        self._streams: dict[str, _Stream] = {}  # touched only by the engine thread
        self._stopping = False
        self._metrics = _Metrics(registry) if registry is not None else None
        self._load = engine.load()
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def load(self) -> EngineLoad:
        """The engine's load after its latest step or command (non-blocking)."""
        return self._load

    def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams, *, hold_kv: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; the last has ``finished=True``. Validation errors raise
        before the first delta. Leaving the stream early aborts the request."""
        prompt = list(prompt_ids)

        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt, params, hold_kv=hold_kv)

        return self._stream(request_id, add)

    async def prefill(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> PrefillResult:
        """PD prefill role: compute the prompt, sample its first token and keep the pages held
        until :meth:`release`. Cancelling before the result is returned frees the pages."""
        async for out in self.generate(request_id, prompt_ids, params, hold_kv=True):
            if out.finished:
                if isinstance(out, PrefillOutput) and out.prefill is not None:
                    return out.prefill
                raise AbortedError(f"prefill of {request_id!r} ended with {out.finish_reason!r}")
        raise AbortedError(f"prefill of {request_id!r} ended without a result")

    async def abort(self, request_id: str) -> bool:
        """Abort a request in any state; its stream (if any) ends with ``finish_reason="abort"``."""
        return bool(await self._call(lambda e: e.abort(request_id)))

    async def reserve(self, request_id: str, num_prompt_tokens: int) -> list[int]:
        return list(
            await self._call(
                lambda e: e.reserve(request_id, num_prompt_tokens), undo=lambda e: e.release(request_id)
            )
        )

    def adopt(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        first_token: int,
        params: SamplingParams,
        first_logprob: float | None = None,
        num_cached_tokens: int = 0,
        first_top_logprobs: list[tuple[int, float]] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Adopt a filled reservation and stream its deltas (the first carries ``first_token``)."""
        prompt = list(prompt_ids)

        def adopt(engine: LLMEngine) -> None:
            engine.adopt(
                request_id, prompt, first_token, params, first_logprob, num_cached_tokens, first_top_logprobs
            )

        return self._stream(request_id, adopt)

    async def release(self, request_id: str) -> bool:
        return bool(await self._call(lambda e: e.release(request_id)))

    async def call(self, fn: Callable[[LLMEngine], T], timeout_s: float | None = None) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps (e.g. to read state)."""
        return await self._call(fn, timeout_s=timeout_s)

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Stop the engine thread; False if it did not stop within ``timeout_s`` seconds."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error("engine thread did not stop within %.1fs", timeout_s)
            return False
        return True

    # ------------------------------------------------------------------ commands
    async def _stream(
        self, request_id: str, start: Callable[[LLMEngine], None]
    ) -> AsyncIterator[RequestOutput]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def start_and_route(engine: LLMEngine) -> None:
            start(engine)  # raises (and routes nothing) on a validation error
            self._streams[request_id] = stream

        await self._call(start_and_route, undo=lambda e: self._abort_now(e, request_id))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(lambda e: self._abort_now(e, request_id))

    async def _call(
        self,
        fn: Callable[[LLMEngine], T],
        *,
        undo: Callable[[LLMEngine], Any] | None = None,
        timeout_s: float | None = None,
    ) -> T:
        fut = self._submit(fn)
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if not fut.cancel() and undo is not None:
                fut.add_done_callback(lambda f: self._undo_if_done(f, undo))
            if isinstance(exc, TimeoutError):
                raise RequestTimeoutError(f"engine did not answer within {timeout:.1f}s") from exc
            raise

    def _undo_if_done(self, fut: cf.Future[Any], undo: Callable[[LLMEngine], Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._submit(undo)

    def _submit(self, fn: Callable[[LLMEngine], Any]) -> cf.Future[Any]:
        fut: cf.Future[Any] = cf.Future()
        with self._cond:
            if self._stopping:
                fut.set_exception(AbortedError("the engine is shut down"))
                return fut
            self._commands.append(_Command(fn, fut))
            self._cond.notify()
        return fut

    def _abort_now(self, engine: LLMEngine, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        return engine.abort(request_id)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not engine.has_unfinished():
                        self._cond.wait(self._idle_wait_s)
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for cmd in commands:
                    if cmd.future.set_running_or_notify_cancel():
                        try:
                            cmd.future.set_result(cmd.fn(engine))
                        except BaseException as exc:
                            cmd.future.set_exception(exc)
                if engine.has_unfinished():
                    self._step(engine)
                self._load = engine.load()
                if self._metrics is not None:
                    self._metrics.observe_load(self._load)
        except BaseException:
            logger.exception("engine thread crashed")
        finally:
            self._close(engine)

    def _step(self, engine: LLMEngine) -> None:
        t0 = time.perf_counter()
        try:
            outputs = engine.step()
        except EngineStepError as exc:
            logger.error("engine step failed: %s", exc)
            self._fail(engine, list(exc.details.get("request_ids", [])), exc)
            if self._metrics is not None:
                self._metrics.step_errors.inc()
            return
        except Exception as exc:
            logger.exception("engine step raised unexpectedly; failing every request")
            err = PdserveError(f"engine failure: {type(exc).__name__}: {exc}")
            self._fail(engine, engine.request_ids(), err)
            return
        if self._metrics is not None:
            self._metrics.steps.inc()
            self._metrics.step_seconds.observe(time.perf_counter() - t0)
            self._metrics.tokens.inc(sum(len(o.new_token_ids) for o in outputs))
        self._dispatch(engine, [(o.request_id, o) for o in outputs])

    def _dispatch(self, engine: LLMEngine, items: Sequence[tuple[str, _Item]]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = defaultdict(list)
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                del self._streams[rid]
            batches[stream.loop].append((stream.queue, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the consumer's loop is closed: nobody will read these
                for queue_item in batch:
                    item = queue_item[1]
                    if isinstance(item, RequestOutput) and not item.finished:
                        engine.abort(item.request_id)

    def _fail(self, engine: LLMEngine, request_ids: Sequence[str], exc: BaseException) -> None:
        for rid in request_ids:
            engine.abort(rid)
        self._dispatch(engine, [(rid, exc) for rid in request_ids])

    def _close(self, engine: LLMEngine) -> None:
        with self._cond:
            self._stopping = True
            commands = list(self._commands)
            self._commands.clear()
        for cmd in commands:
            if cmd.future.set_running_or_notify_cancel():
                cmd.future.set_exception(AbortedError("the engine is shut down"))
        err = AbortedError("the engine is shut down")
        try:
            self._fail(engine, engine.request_ids(), err)
            engine.step()  # drop the abort deltas
        except Exception:
            logger.exception("error while closing the engine")
        self._load = engine.load()


def _deliver(batch: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
