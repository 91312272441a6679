"""The prefill leg of a PD request: compute the prompt and ship its KV to the decode worker.

Lifecycle of one request carrying ``(bootstrap_host, bootstrap_port, bootstrap_room)``:

1. open the room (``create_sender``); a duplicate or malformed room is a 400;
2. wait until the decode registered its destination pages (decode-first: decode memory throttles
   prefill) — bounded by ``kvtransfer.bootstrap_timeout_s``, and abandoned at once when the
   request is cancelled (the router cancels this leg when the decode leg fails);
3. attach the sender to the :class:`LayerStreamer` and run the prompt through the engine with
   ``hold_kv=True`` (one sampled token; pages held after it finishes): each layer's pages are
   shipped while the next layer computes;
4. ``finish(aux)``: the first token, its logprob and the cached-token count follow the pages;
   returns once the decode verified them; then the held pages are released;
5. yield one finished :class:`RequestOutput` (the first token): the HTTP answer of this leg.

On any failure or cancellation the room is aborted (the decode is told and frees its pages),
the leg waits (bounded) until kvtransfer no longer reads the source pages, and the engine
request is aborted or its held pages released. Errors keep their type (``TransferError``
subclasses carry 4xx/5xx statuses; a timeout is 504, a dead peer 502).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator

from pdserve.api.backend import BootstrapInfo
from pdserve.decode_worker.metrics import WorkerMetrics
from pdserve.decode_worker.watch import CancelWatch, closing
from pdserve.engine.async_engine import AsyncLLMEngine
from pdserve.engine.llm_engine import PrefillOutput
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import AbortedError, PdserveError, WorkerError
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import RoomError, TransferError
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.runtime import wait_until
from pdserve.kvtransfer.sender import KVSender
from pdserve.prefill_worker.layer_stream import LayerStreamer

logger = logging.getLogger(__name__)


class PrefillLeg:
    """Runs prefill legs on one engine + transfer service (one instance per worker)."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        service: PrefillTransferService,
        streamer: LayerStreamer,
        metrics: WorkerMetrics,
        *,
        transfer: TransferConfig,
        compute_timeout_s: float,
    ) -> None:
        self.engine = engine
        self.service = service
        self.streamer = streamer
        self.metrics = metrics
        self.transfer = transfer
        self.compute_timeout_s = compute_timeout_s
        self.awaiting_decode = 0  # rooms waiting for the decode's registration
        self.awaiting_decode_tokens = 0
        self.transferring = 0  # prompt computed, pages on the way

    async def run(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        boot: BootstrapInfo,
        watch: CancelWatch,
    ) -> AsyncIterator[RequestOutput]:
        sender = self.service.create_sender(boot.room, bootstrap_host=boot.host)
        ok = False
        in_engine = False
        try:
            await self._wait_registered(sender, len(prompt), watch)
            self.streamer.attach(request_id, sender, len(prompt))
            in_engine = True
            final = await watch.run(
                self._compute(request_id, prompt, params), self.compute_timeout_s, "computing the prompt"
            )
            self.streamer.detach(request_id)
            result = final.prefill
            if result is None:  # pragma: no cover - the engine always attaches it
                raise WorkerError(f"prefill of {request_id!r} returned no KV")
            logprob = result.first_logprob if math.isfinite(result.first_logprob) else None
            aux = AuxData(
                room=boot.room,
                first_token_id=result.first_token_id,
                first_token_logprob=logprob,
                cached_tokens=result.num_cached_tokens,
                top_logprobs=tuple((int(t), float(lp)) for t, lp in result.first_top_logprobs),
            )
            sender.set_source(result.block_ids)  # no-op when layer streaming already named them
            self.transferring += 1
            t0 = time.perf_counter()
            try:
                outcome = await watch.run(sender.finish(aux), self._finish_budget(), "transferring the KV")
            finally:
                self.transferring -= 1
            self.metrics.transfer_seconds.labels("prefill").observe(time.perf_counter() - t0)
            self.metrics.transfer_bytes.labels("prefill").inc(outcome.nbytes)
            ok = True
            in_engine = False
            await self._free(request_id)  # kvtransfer no longer reads the pages
            yield final
        except RoomError as exc:
            self.metrics.transfer_failures.labels("prefill", exc.reason).inc()
            if not in_engine:
                raise  # a malformed or duplicate room: the client's mistake (400)
            # the prompt's pages moved under the room (the sequence was preempted and recomputed
            # elsewhere): this worker's problem, and a retry on a new pair succeeds (502)
            raise WorkerError(f"prefill of {request_id!r} lost its KV pages mid-transfer: {exc}") from exc
        except TransferError as exc:
            self.metrics.transfer_failures.labels("prefill", exc.reason).inc()
            raise
        finally:
            self.streamer.detach(request_id)
            if not ok:
                await self._abort_room(sender, watch)
            if in_engine:
                await self._free(request_id)

    async def _wait_registered(self, sender: KVSender, num_tokens: int, watch: CancelWatch) -> None:
        self.awaiting_decode += 1
        self.awaiting_decode_tokens += num_tokens
        try:
            # the room's own bootstrap timer fails it first (TransferTimeoutError, 504); the
            # bounds here are backstops
            await watch.run(
                sender.wait_ready(self.transfer.bootstrap_timeout_s + 0.5),
                self.transfer.bootstrap_timeout_s + 1.0,
                "waiting for the decode worker's registration",
            )
        finally:
            self.awaiting_decode -= 1
            self.awaiting_decode_tokens -= num_tokens

    async def _compute(self, request_id: str, prompt: list[int], params: SamplingParams) -> PrefillOutput:
        stream = self.engine.generate(request_id, prompt, params, hold_kv=True)
        async with closing(stream):
            async for out in stream:
                if out.finished:
                    if isinstance(out, PrefillOutput) and out.prefill is not None:
                        return out
                    raise AbortedError(f"prefill of {request_id!r} ended with {out.finish_reason!r}")
        raise WorkerError(f"prefill of {request_id!r} ended without a result")

    def _finish_budget(self) -> float:
        t = self.transfer
        return t.waiting_timeout_s + t.transfer_timeout_s + t.abort_timeout_s + 1.0

    async def _abort_room(self, sender: KVSender, watch: CancelWatch) -> None:
        """Fail the room (the decode is told) and wait until kvtransfer left its pages."""
        room = sender.room
        if self.service.poll(room) is None:
            return
        sender.abort(f"prefill leg ended: {watch.reason if watch.cancelled.is_set() else 'error'}")
        settled = await wait_until(
            lambda: self.service.poll(room) is None, self.transfer.abort_timeout_s + 1.0
        )
        if not settled:
            logger.error("room %d did not settle after its abort; releasing its pages anyway", room)

    async def _free(self, request_id: str) -> None:
        """Abort the engine request (queued, running or held): its pages go back to the pool."""
        try:
            await self.engine.abort(request_id)
        except PdserveError as exc:
            logger.error("request %s: could not free its prefill pages: %s", request_id, exc)


__all__ = ["PrefillLeg"]
