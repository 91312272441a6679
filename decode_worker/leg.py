"""The decode leg of a PD request: reserve pages, receive the prompt's KV, adopt it and decode.

Lifecycle of one request carrying ``(bootstrap_host, bootstrap_port, bootstrap_room)``:

1. reserve KV pages for the prompt plus the first output token; when the pool is full the leg
   retries for up to ``limits.reserve_wait_s`` and then answers 503 (a router retries elsewhere);
2. ``receive``: register the room and the destination pages with the prefill's bootstrap
   endpoint and wait for the pages and the aux data (first token, its logprob, cached tokens);
   every phase has kvtransfer's timeout, a dead or restarted prefill fails the room within the
   heartbeat window, and a cancelled request aborts the room at once;
3. ``adopt`` turns the filled reservation into a running sequence (no forward pass) and its
   deltas are streamed; the first carries the prefill's token;
4. on failure or cancellation before the adopt, the reservation is released (kvtransfer
   guarantees nothing writes into the pages once ``receive`` returned or raised); after the
   adopt, leaving the stream early aborts the engine request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pdserve.api.backend import BootstrapInfo
from pdserve.decode_worker.metrics import WorkerMetrics
from pdserve.decode_worker.watch import CancelWatch, closing
from pdserve.engine.async_engine import AsyncLLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import OverloadedError, PdserveError
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.decode import DecodeTransferService
from pdserve.kvtransfer.errors import TransferError

logger = logging.getLogger(__name__)


class DecodeLeg:
    """Runs decode legs on one engine + transfer service (one instance per worker)."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        service: DecodeTransferService,
        metrics: WorkerMetrics,
        *,
        transfer: TransferConfig,
        default_bootstrap_port: int,
        reserve_wait_s: float,
    ) -> None:
        self.engine = engine
        self.service = service
        self.metrics = metrics
        self.transfer = transfer
        self.default_bootstrap_port = default_bootstrap_port
        self.reserve_wait_s = reserve_wait_s
        self.block_size = service.layout.block_size
        self.block_nbytes = service.layout.block_nbytes
        self.awaiting_kv = 0  # legs with reserved pages, waiting for the transfer
        self.reserve_waits = 0  # legs waiting for free pages
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        boot: BootstrapInfo,
        watch: CancelWatch,
    ) -> AsyncIterator[RequestOutput]:
        blocks = await self._reserve(request_id, len(prompt), watch)
        adopted = False
        try:
            port = boot.port if boot.port is not None else self.default_bootstrap_port
            t0 = time.perf_counter()
            self.awaiting_kv += 1
            try:
                aux = await watch.run(
                    self.service.receive(boot.host, port, boot.room, blocks),
                    self._receive_budget(),
                    "waiting for the prompt's KV pages",
                )
            finally:
                self.awaiting_kv -= 1
            self.metrics.transfer_seconds.labels("decode").observe(time.perf_counter() - t0)
            pages = -(-len(prompt) // self.block_size)
            self.metrics.transfer_bytes.labels("decode").inc(pages * self.block_nbytes)
            stream = self.engine.adopt(
                request_id,
                prompt,
                aux.first_token_id,
                params,
                aux.first_token_logprob,
                aux.cached_tokens,
                [(int(t), float(lp)) for t, lp in aux.top_logprobs] or None,
            )
            watch.on_cancel(lambda: self._abort_soon(request_id))
            async with closing(stream):
                async for out in stream:
                    adopted = True
                    yield out
        except TransferError as exc:
            self.metrics.transfer_failures.labels("decode", exc.reason).inc()
            raise
        finally:
            if not adopted:
                await self._release(request_id)

    async def _reserve(self, request_id: str, num_tokens: int, watch: CancelWatch) -> list[int]:
        deadline = time.monotonic() + self.reserve_wait_s
        delay = 0.01
        waiting = False
        try:
            while True:
                try:
                    return await self.engine.reserve(request_id, num_tokens)
                except OverloadedError:
                    if time.monotonic() + delay > deadline:
                        raise
                if not waiting:
                    waiting = True
                    self.reserve_waits += 1
                watch.check()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        finally:
            if waiting:
                self.reserve_waits -= 1

    def _receive_budget(self) -> float:
        t = self.transfer
        return t.bootstrap_timeout_s + t.waiting_timeout_s + t.transfer_timeout_s + t.abort_timeout_s + 2.0

    async def _release(self, request_id: str) -> None:
        try:
            await self.engine.release(request_id)
        except PdserveError as exc:
            logger.error("request %s: could not release its reserved pages: %s", request_id, exc)

    def _abort_soon(self, request_id: str) -> None:
        task = asyncio.ensure_future(self.engine.abort(request_id))
        self._tasks.add(task)
        task.add_done_callback(_forget(self._tasks))


def _forget(tasks: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("abort failed: %s", task.exception())

    return done


__all__ = ["DecodeLeg"]
