"""``WorkerBackend``: the worker's :class:`~pdserve.api.backend.GenerateBackend` — picks the leg.

Per request (``generate(request_id, prompt_ids, params, ctx=...)``):

1. choose the leg from the role and the request's bootstrap triple: ``prefill`` (prefill role,
   triple required), ``decode`` (decode role with a triple), ``local`` (colocated ``both``, or a
   decode worker given no triple: conditional disaggregation sends short prompts that way);
2. validate the prompt ids against the vocabulary before any page is reserved;
3. run the leg under a :class:`CancelWatch` (client disconnect, ``/abort_request``) and record
   TTFT / inter-token / e2e latency and the outcome (``ok``, ``aborted``, ``timeout``,
   ``invalid``, ``overloaded``, ``transfer_failed``, ``error``);
4. the request is registered in :attr:`inflight` (for ``/abort_request``) until its stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from pdserve.api.backend import RequestContext
from pdserve.decode_worker.leg import DecodeLeg
from pdserve.decode_worker.metrics import WorkerMetrics
from pdserve.decode_worker.watch import CancelWatch, closing
from pdserve.engine.async_engine import AsyncLLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import (
    AbortedError,
    InvalidRequestError,
    OverloadedError,
    PdserveError,
    RequestTimeoutError,
)
from pdserve.kvtransfer.errors import TransferAbortedError, TransferError, TransferTimeoutError
from pdserve.prefill_worker.leg import PrefillLeg

logger = logging.getLogger(__name__)


def outcome_of(exc: BaseException, ctx: RequestContext) -> str:
    """The low-cardinality outcome label of a request that ended with ``exc``."""
    if isinstance(exc, AbortedError | TransferAbortedError | asyncio.CancelledError | GeneratorExit):
        return "aborted"
    if ctx.cancelled:
        return "aborted"
    if isinstance(exc, RequestTimeoutError | TransferTimeoutError):
        return "timeout"
    if isinstance(exc, TransferError):
        return "transfer_failed"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, InvalidRequestError):
        return "invalid"
    return "error"


class WorkerBackend:
    def __init__(
        self,
        role: str,
        engine: AsyncLLMEngine,
        metrics: WorkerMetrics,
        *,
        vocab_size: int,
        disconnect_poll_s: float,
        prefill: PrefillLeg | None = None,
        decode: DecodeLeg | None = None,
    ) -> None:
        if role == "prefill" and prefill is None:
            raise PdserveError("a prefill worker needs its prefill leg")
        if role == "decode" and decode is None:
            raise PdserveError("a decode worker needs its decode leg")
        self.role = role
        self.engine = engine
        self.metrics = metrics
        self.vocab_size = vocab_size
        self.poll_s = disconnect_poll_s
        self.prefill = prefill
        self.decode = decode
        self.inflight: dict[str, RequestContext] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def leg_for(self, ctx: RequestContext) -> str:
        if self.role == "prefill":
            if ctx.bootstrap is None:
                raise InvalidRequestError(
                    "this is a prefill worker: requests need bootstrap_host and bootstrap_room "
                    "(send them through a PD router)",
                    param="bootstrap_host",
                )
            return "prefill"
        if self.role == "decode" and ctx.bootstrap is not None:
            return "decode"
        return "local"

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} outside the vocabulary [0, {self.vocab_size})", param="prompt"
            )

    def abort(self, request_id: str | None, reason: str = "aborted by /abort_request") -> int:
        """Cancel one in-flight request (or every one with ``None``); returns how many."""
        targets = list(self.inflight.values()) if request_id is None else [self.inflight.get(request_id)]
        n = 0
        for ctx in targets:
            if ctx is not None and not ctx.cancelled:
                ctx.cancel(reason)
                n += 1
        return n

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, ctx: RequestContext
    ) -> AsyncIterator[RequestOutput]:
        leg = self.leg_for(ctx)
        self.check_prompt(prompt_ids)
        timer = self.metrics.request(leg)
        registered = self.inflight.setdefault(request_id, ctx) is ctx
        outcome: str | None = None
        try:
            async with CancelWatch(ctx, self.poll_s) as watch:
                it = self._leg(leg, request_id, prompt_ids, params, ctx, watch)
                async with closing(it):
                    async for out in it:
                        timer.output(out)
                        if out.finished:
                            outcome = "aborted" if out.finish_reason == "abort" else "ok"
                        yield out
        except BaseException as exc:
            outcome = outcome or outcome_of(exc, ctx)
            raise
        finally:
            if registered:
                self.inflight.pop(request_id, None)
            timer.done(outcome or "aborted", len(prompt_ids))

    def _leg(
        self,
        leg: str,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        ctx: RequestContext,
        watch: CancelWatch,
    ) -> AsyncIterator[RequestOutput]:
        boot = ctx.bootstrap
        if leg == "prefill" and self.prefill is not None and boot is not None:
            return self.prefill.run(request_id, prompt, params, boot, watch)
        if leg == "decode" and self.decode is not None and boot is not None:
            return self.decode.run(request_id, prompt, params, boot, watch)
        return self._local(request_id, prompt, params, watch)

    async def _local(
        self, request_id: str, prompt: list[int], params: SamplingParams, watch: CancelWatch
    ) -> AsyncIterator[RequestOutput]:
        stream = self.engine.generate(request_id, prompt, params)
        watch.on_cancel(lambda: self._abort_soon(request_id))
        async with closing(stream):
            async for out in stream:
                yield out

    def _abort_soon(self, request_id: str) -> None:
        task = asyncio.ensure_future(self.engine.abort(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("abort failed: %s", task.exception())


__all__ = ["WorkerBackend", "outcome_of"]
