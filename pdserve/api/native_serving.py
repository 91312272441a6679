"""Worker-side SGLang ``/generate`` on top of a :class:`GenerateBackend`.

Lifecycle of one request (same bounded-wait and cleanup rules as the OpenAI endpoints, see
:mod:`pdserve.api.serving_base`):

1. :func:`request_to_engine` turns the body into prompt ids + :class:`SamplingParams` (400s).
2. The context gets the request id (``rid`` or a fresh one), the PD bootstrap triple and the body's
   unknown fields; ``backend.generate`` is called.
3. Streaming: the first delta is awaited before the SSE iterator is returned; then one chunk per
   delta (cumulative text/ids/logprobs like SGLang's default, or deltas when the server or the
   request's ``incremental_streaming_output`` asks for them), then ``data: [DONE]``. An error after
   the first byte becomes ``data: {"error": {...}}`` before ``[DONE]``.
4. Non-streaming: one ``{"text", "output_ids", "meta_info"}`` body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from pdserve.api.backend import ChatTokenizer, GenerateBackend, RequestContext
from pdserve.api.backend_stream import BackendStream
from pdserve.api.logprobs import TokenTexts
from pdserve.api.native import NativeOutputWriter, request_to_engine
from pdserve.api.protocol import GenerateRequest
from pdserve.api.serving_base import ServingBase
from pdserve.api.sse import sse_event
from pdserve.engine.outputs import RequestOutput
from pdserve.errors import WorkerError

logger = logging.getLogger(__name__)


class NativeServing(ServingBase):
    """SGLang-compatible ``/generate`` for a worker. ``incremental_streaming_output`` is the server
    default (SGLang's default is cumulative); a request may override it."""

    def __init__(
        self,
        backend: GenerateBackend,
        tokenizer: ChatTokenizer | None,
        *,
        served_model_name: str,
        model_max_len: int,
        default_max_tokens: int = 128,
        sampling_defaults: Mapping[str, Any] | None = None,
        incremental_streaming_output: bool = False,
        first_output_timeout_s: float = 120.0,
        output_timeout_s: float = 60.0,
        request_timeout_s: float | None = None,
        close_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            backend,
            served_model_name=served_model_name,
            model_max_len=model_max_len,
            default_max_tokens=default_max_tokens,
            sampling_defaults=sampling_defaults,
            first_output_timeout_s=first_output_timeout_s,
            output_timeout_s=output_timeout_s,
            request_timeout_s=request_timeout_s,
            close_timeout_s=close_timeout_s,
        )
        self._native_tokenizer = tokenizer
        self._incremental = incremental_streaming_output
        self._native_max_tokens = default_max_tokens
        self._texts = TokenTexts(tokenizer) if tokenizer is not None else None

    async def generate(
        self, req: GenerateRequest, ctx: RequestContext | None = None
    ) -> dict[str, Any] | AsyncIterator[bytes]:
        prompt_ids, params = request_to_engine(
            req,
            self._native_tokenizer,
            model_max_len=self.model_max_len,
            default_max_tokens=self._native_max_tokens,
        )
        ctx = self._prepare_ctx(ctx, req, req.text if isinstance(req.text, str) else None)
        incremental = req.incremental_streaming_output
        writer = NativeOutputWriter(
            ctx.request_id,
            prompt_tokens=len(prompt_ids),
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            token_text=self._texts if (req.return_text_in_logprobs and self._texts is not None) else None,
            incremental=self._incremental if incremental is None else incremental,
        )
        it = self._backend.generate(ctx.request_id, prompt_ids, params, ctx=ctx)
        if not req.stream:
            outputs, _ = await self._collect(self._open(it, ctx), len(prompt_ids))
            for out in outputs:
                writer.add(out)
            if outputs[-1].finish_reason == "abort":
                raise WorkerError("generation was aborted by the backend")
            return writer.response(outputs[-1])
        stream = self._open(it, ctx)
        first = await self._prime(stream)
        return self._sse(stream, self._events(stream, first, writer), "generate")

    async def _events(
        self, stream: BackendStream, first: RequestOutput, writer: NativeOutputWriter
    ) -> AsyncGenerator[bytes, None]:
        out = first
        while True:
            yield sse_event(writer.chunk(out))
            if out.finished:
                return
            out = await stream.next(self._output_timeout)
