"""The router's :class:`~pdserve.api.backend.GenerateBackend`: OpenAI requests over PD dispatch.

``OpenAIServing`` (pdserve.api) validates, templates and tokenises; this backend turns each
request into a native SGLang ``/generate`` body with ``input_ids`` and ``stream: true``, sends it
through the :class:`~pdserve.router.dispatch.Dispatcher` (both legs, retries before the first
token) and parses the decode worker's SSE stream into :class:`RequestOutput` deltas.

Per-request lifecycle:

1. Build the body (SGLang sampling field names) and the routing key from the prompt ids.
2. ``Dispatcher.open`` -> committed decode stream (first chunk in hand).
3. Decode SSE events; each becomes one delta. SGLang streams cumulative ``text``/``output_ids``
   by default and deltas when ``incremental_streaming_output`` is on; both are accepted (a chunk
   is cumulative iff its id count equals ``meta_info.completion_tokens``).
4. ``finally``: a stream left early (client gone, timeout, error) aborts both legs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from pdserve.api.backend import RequestContext
from pdserve.api.sse import DONE_PAYLOAD, SSEDecoder
from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import PdserveError, WorkerError
from pdserve.router.dispatch import Exchange
from pdserve.router.state import RouterState

logger = logging.getLogger(__name__)

PASSTHROUGH_EXTRAS = ("routed_dp_rank", "disagg_prefill_dp_rank")


def native_body(request_id: str, prompt_ids: list[int], params: SamplingParams,
                extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """SGLang ``/generate`` body for one request (streamed)."""
    sp: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": params.skip_special_tokens,
    }
    if params.stop:
        sp["stop"] = list(params.stop)
    if params.stop_token_ids:
        sp["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        sp["sampling_seed"] = params.seed
    body: dict[str, Any] = {"input_ids": prompt_ids, "sampling_params": sp, "stream": True, "rid": request_id}
    if params.logprobs is not None:
        body["return_logprob"] = True
        body["top_logprobs_num"] = params.logprobs
    for k in PASSTHROUGH_EXTRAS:
        if extras and k in extras:
            body[k] = extras[k]
    return body


class StreamParser:
    """SGLang ``/generate`` stream events -> RequestOutput deltas (cumulative or incremental)."""

    __slots__ = ("_n_ids", "_n_lp", "_n_text", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._n_ids = 0
        self._n_text = 0
        self._n_lp = 0

    def parse(self, payload: bytes) -> RequestOutput | None:
        if payload == DONE_PAYLOAD:
            return None
        try:
            ev = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise WorkerError(f"decode worker sent a malformed stream event: {exc}") from None
        if not isinstance(ev, dict):
            raise WorkerError("decode worker sent a non-object stream event")
        if "error" in ev:
            err = ev["error"]
            msg = err.get("message") if isinstance(err, dict) else str(err)
            raise WorkerError(f"decode worker failed: {msg}")
        meta = ev.get("meta_info") or {}
        ids = ev.get("output_ids") or []
        text = ev.get("text") or ""
        completion = meta.get("completion_tokens")
        cumulative = isinstance(completion, int) and len(ids) == completion and completion > 0
        if cumulative:
            new_ids = ids[self._n_ids:]
            new_text = text[self._n_text:]
            self._n_ids, self._n_text = len(ids), len(text)
        else:
            new_ids, new_text = ids, text
            self._n_ids += len(ids)
            self._n_text += len(text)
        new_lp = self._logprobs(meta, cumulative)
        fin = meta.get("finish_reason")
        reason: str | None = None
        matched: int | str | None = None
        if isinstance(fin, dict):
            reason = str(fin.get("type") or "stop")
            m = fin.get("matched")
            matched = m if isinstance(m, int | str) else None
        elif isinstance(fin, str):
            reason = fin
        if reason == "abort" and isinstance(fin, dict) and fin.get("message"):
            logger.info("request %s aborted by the worker: %s", self.request_id, fin.get("message"))
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=[int(t) for t in new_ids],
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            matched_stop=matched,
            new_logprobs=new_lp,
            num_prompt_tokens=int(meta.get("prompt_tokens") or 0),
            num_output_tokens=int(completion or self._n_ids),
            num_cached_tokens=int(meta.get("cached_tokens") or 0),
        )

    def _logprobs(self, meta: dict[str, Any], cumulative: bool) -> list[TokenLogprob] | None:
        toks = meta.get("output_token_logprobs")
        if not isinstance(toks, list):
            return None
        tops = meta.get("output_top_logprobs")
        start = self._n_lp if cumulative else 0
        out: list[TokenLogprob] = []
        for i in range(start, len(toks)):
            entry = toks[i]
            if not isinstance(entry, list | tuple) or len(entry) < 2:
                continue
            top: list[tuple[int, float]] = []
            if isinstance(tops, list) and i < len(tops) and isinstance(tops[i], list):
                top = [
                    (int(t[1]), float(t[0])) for t in tops[i] if isinstance(t, list | tuple) and len(t) >= 2
                ]
            out.append(TokenLogprob(token_id=int(entry[1]), logprob=float(entry[0]), top=top))
        self._n_lp = len(toks) if cumulative else self._n_lp + len(toks)
        return out


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
        body = native_body(request_id, prompt_ids, params, ctx.extras)
        key = state.key_for_ids(prompt_ids)
        ex: Exchange | None = None
        ok = False
        err: BaseException | None = None
        try:
            ex = await state.dispatcher.open(body, key, stream=True)
            mode = ex.route.mode
            parser = StreamParser(request_id)
            decoder = SSEDecoder()
            chunk: bytes | None = ex.first
            first = True
            last = t0
            while chunk is not None:
                for payload in decoder.feed(chunk):
                    out = parser.parse(payload)
                    if out is None:
                        continue
                    now = time.monotonic()
                    if first:
                        metrics.observe_ttft(mode, now - t0)
                        first = False
                    else:
                        metrics.itl.observe(now - last)
                    last = now
                    if out.finished:
                        ok = True
                        metrics.observe_e2e(mode, now - t0)
                    yield out
                    if ok:
                        return
                chunk = await ex.next_chunk()
            for payload in decoder.finish():
                out = parser.parse(payload)
                if out is not None:
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
