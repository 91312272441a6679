"""The router's :class:`~pdserve.api.backend.GenerateBackend`: OpenAI requests over PD dispatch.

``OpenAIServing`` (pdserve.api) validates, templates and tokenises; this backend turns each
request into a native SGLang ``/generate`` body with ``input_ids`` and ``stream: true``, sends it
through the :class:`~pdserve.router.dispatch.Dispatcher` (both legs, retries before the first
token) and parses the decode worker's SSE stream into :class:`RequestOutput` deltas.

Per-request lifecycle:

1. Build the body (SGLang sampling field names) and the routing key from the prompt ids.
2. ``Dispatcher.open`` -> committed decode stream (first chunk in hand).
3. Decode SSE events with the api layer's ``NativeOutputParser``; each becomes one delta (SGLang's
   cumulative default and incremental streams are both accepted).
4. ``finally``: a stream left early (client gone, timeout, error) aborts both legs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import orjson

from pdserve.api.backend import RequestContext
from pdserve.api.native import NativeOutputParser, build_generate_request
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import PdserveError, WorkerError
from pdserve.router.dispatch import Exchange
from pdserve.router.state import RouterState

logger = logging.getLogger(__name__)

PASSTHROUGH_EXTRAS = ("routed_dp_rank", "disagg_prefill_dp_rank")


class PDBackend:
    """GenerateBackend over the router's dispatcher."""

    def __init__(self, state: RouterState) -> None:
        self.state = state

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, ctx: RequestContext,
    ) -> AsyncIterator[RequestOutput]:
        state = self.state
        metrics = state.metrics
        t0 = time.monotonic()
        extras = {k: ctx.extras[k] for k in PASSTHROUGH_EXTRAS if k in ctx.extras}
        body = build_generate_request(prompt_ids, params, rid=request_id, stream=True, extras=extras)
        key = state.key_for_ids(prompt_ids)
        ex: Exchange | None = None
        ok = False
        err: BaseException | None = None
        try:
            ex = await state.dispatcher.open(body, key, stream=True)
            if hasattr(ctx, "exchange"):  # a RouterContext: lets the response clean up after us
                ctx.exchange = ex
            mode = ex.route.mode
            parser = NativeOutputParser(request_id)
            chunk: bytes | None = ex.first
            first = True
            last = t0
            while chunk is not None:
                for out in _parse(parser, chunk):
                    now = time.monotonic()
                    if first:
                        metrics.observe_ttft(mode, now - t0)
                        first = False
                    else:
                        metrics.observe_itl(now - last)
                    last = now
                    if out.finished:
                        ok = True
                        metrics.observe_e2e(mode, now - t0)
                    yield out
                    if ok:
                        return
                chunk = await ex.next_chunk()
            for out in _parse(parser, None):
                ok = out.finished
                yield out
                if ok:
                    return
            raise WorkerError("decode worker ended its stream without a finish reason")
        except PdserveError as exc:
            err = exc
            raise
        finally:
            if ex is not None:
                if ok:
                    ex.finish(ok=True)
                elif err is not None:
                    ex.finish(ok=False, error=err)
                else:
                    ex.abort("client")


def _parse(parser: NativeOutputParser, chunk: bytes | None) -> list[RequestOutput]:
    try:
        return parser.feed_sse(chunk) if chunk is not None else parser.finish_sse()
    except orjson.JSONDecodeError as exc:
        raise WorkerError(f"decode worker sent a malformed stream event: {exc}") from None
