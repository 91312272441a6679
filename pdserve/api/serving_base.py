"""Shared plumbing of the OpenAI and native servers: limits, sampling params, and bounded waits on a
:class:`GenerateBackend` stream.

Backend-stream lifecycle every endpoint follows:

1. ``generate(...)`` returns an async iterator; nothing runs until the first ``anext``.
2. It is wrapped in a :class:`BackendStream`; every wait is bounded: ``first_output_timeout_s``
   for the first delta (queueing + prefill), ``output_timeout_s`` between deltas, and the request
   deadline when the context has one (408 on expiry; 502 for a stream without a final delta).
3. Streaming endpoints await the first delta before returning their SSE iterator (``_prime``), so
   early failures are HTTP statuses, not error events; ``_sse`` frames the events after that
   (``[DONE]`` last; an error after the first byte becomes an error event before ``[DONE]``).
4. Whatever happens, ``BackendStream.close`` runs: on an abnormal exit it cancels the context
   first, then closes the iterator so the backend's ``finally`` frees its resources.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Protocol

from pdserve.api.backend import BootstrapInfo, GenerateBackend, RequestContext
from pdserve.api.backend_stream import BackendStream
from pdserve.api.sse import SSE_DONE, sse_event
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import (
    AbortedError,
    ConfigError,
    ContextLengthError,
    ModelNotFoundError,
    PdserveError,
    WorkerError,
)

logger = logging.getLogger(__name__)

INTERNAL_ERROR_BODY: dict[str, Any] = {
    "error": {"message": "internal server error", "type": "internal_error", "param": None, "code": 500}
}


class _RequestFields(Protocol):
    """What ``_prepare_ctx`` reads from any request model."""

    rid: str | None
    stream: bool
    bootstrap_host: str | None
    bootstrap_port: int | None
    bootstrap_room: int | None

    @property
    def model_extra(self) -> dict[str, Any] | None: ...


class UsageCounter:
    """Token counts over a request's deltas (robust to per-delta or cumulative output counts)."""

    __slots__ = ("cached", "max_output", "prompt", "summed")

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt = prompt_tokens
        self.summed = 0
        self.max_output = 0
        self.cached = 0

    def add(self, out: RequestOutput) -> None:
        self.summed += len(out.new_token_ids)
        if out.num_output_tokens > self.max_output:
            self.max_output = out.num_output_tokens
        if out.num_prompt_tokens > self.prompt:
            self.prompt = out.num_prompt_tokens
        if out.num_cached_tokens > self.cached:
            self.cached = out.num_cached_tokens

    @property
    def completion(self) -> int:
        return max(self.summed, self.max_output)

    def to_dict(self) -> dict[str, Any]:
        completion = self.completion
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": completion,
            "total_tokens": self.prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


class ServingBase:
    """Limits, defaults and backend-stream helpers shared by the OpenAI and native endpoints."""

    def __init__(
        self,
        backend: GenerateBackend,
        *,
        served_model_name: str,
        model_max_len: int,
        default_max_tokens: int | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
        first_output_timeout_s: float = 120.0,
        output_timeout_s: float = 60.0,
        request_timeout_s: float | None = None,
        close_timeout_s: float = 5.0,
    ) -> None:
        if model_max_len < 2:
            raise ConfigError(f"model_max_len must be >= 2, got {model_max_len}")
        for name, value in (
            ("first_output_timeout_s", first_output_timeout_s),
            ("output_timeout_s", output_timeout_s),
            ("close_timeout_s", close_timeout_s),
            ("request_timeout_s", request_timeout_s or 1.0),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        self._backend = backend
        self.model_name = served_model_name
        self.model_max_len = model_max_len
        self._default_max_tokens = default_max_tokens
        self._defaults = dict(sampling_defaults or {})
        try:
            SamplingParams(**{**self._defaults, "max_tokens": 1})
        except Exception as exc:
            raise ConfigError(f"invalid sampling_defaults: {exc}") from exc
        self._first_timeout = first_output_timeout_s
        self._output_timeout = output_timeout_s
        self._request_timeout = request_timeout_s
        self._close_timeout = close_timeout_s

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFoundError(
                f"The model {model!r} does not exist; this server serves {self.model_name!r}", param="model"
            )

    def _max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        room = self.model_max_len - prompt_len
        if room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {self.model_max_len} tokens. However, your prompt "
                f"has {prompt_len} tokens, which leaves no room for output.",
                param="messages",
            )
        if requested is None:
            return min(self._default_max_tokens, room) if self._default_max_tokens else room
        if requested > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.model_max_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                f"completion). Reduce the prompt or {param}.",
                param=param,
            )
        return requested

    def _sampling_params(self, overrides: Mapping[str, Any], **fixed: Any) -> SamplingParams:
        """Server defaults, then the request's non-None ``overrides``, then ``fixed``."""
        fields: dict[str, Any] = dict(self._defaults)
        fields.update((k, v) for k, v in overrides.items() if v is not None)
        fields.update(fixed)
        return SamplingParams(**fields)

    def _prepare_ctx(
        self, ctx: RequestContext | None, req: _RequestFields, prompt_text: str | None
    ) -> RequestContext:
        ctx = ctx if ctx is not None else RequestContext()
        if not ctx.request_id:
            ctx.request_id = req.rid or uuid.uuid4().hex
        ctx.prompt_text = prompt_text
        ctx.stream = req.stream
        if ctx.bootstrap is None:
            ctx.bootstrap = BootstrapInfo.from_fields(
                req.bootstrap_host, req.bootstrap_port, req.bootstrap_room
            )
        if req.model_extra:
            ctx.extras.update(req.model_extra)
        if ctx.deadline is None and self._request_timeout is not None:
            ctx.deadline = time.monotonic() + self._request_timeout
        return ctx

    @staticmethod
    def _finish_reason(out: RequestOutput, tool_calls: bool) -> str:
        reason = out.finish_reason or "stop"
        if reason == "abort":
            raise WorkerError("generation was aborted by the backend")
        if reason == "stop" and tool_calls:
            return "tool_calls"
        return reason

    def _open(self, it: AsyncIterator[RequestOutput], ctx: RequestContext) -> BackendStream:
        return BackendStream(it, ctx, close_timeout_s=self._close_timeout)

    async def _prime(self, stream: BackendStream) -> RequestOutput:
        """The first delta of a streamed request (closing the stream if it fails)."""
        try:
            return await stream.next(self._first_timeout)
        except BaseException:
            await stream.close(False)
            raise

    async def _sse(
        self, stream: BackendStream, events: AsyncGenerator[bytes, None], what: str
    ) -> AsyncIterator[bytes]:
        """``events`` (the SSE events of ``stream``'s deltas) as one SSE response: ``[DONE]`` after
        them; a failure becomes an error event before ``[DONE]``; ``stream`` is closed either way."""
        done = False
        try:
            async for event in events:
                yield event
            done = True
            yield SSE_DONE
        except PdserveError as exc:
            yield sse_event(exc.to_openai())
            yield SSE_DONE
        except Exception:
            logger.exception("%s stream %s failed", what, stream.ctx.request_id)
            yield sse_event(INTERNAL_ERROR_BODY)
            yield SSE_DONE
        finally:
            await events.aclose()
            await stream.close(done)

    async def _collect(
        self, stream: BackendStream, prompt_len: int
    ) -> tuple[list[RequestOutput], UsageCounter]:
        """All deltas of a non-streaming request (the last one is ``finished``)."""
        outputs: list[RequestOutput] = []
        usage = UsageCounter(prompt_len)
        done = False
        try:
            timeout = self._first_timeout
            while True:
                out = await stream.next(timeout)
                usage.add(out)
                outputs.append(out)
                if out.finished:
                    break
                timeout = self._output_timeout
            ctx = stream.ctx
            if outputs[-1].finish_reason == "abort" and ctx.cancelled:
                raise AbortedError(f"request {ctx.request_id} was cancelled: {ctx.cancel_reason}")
            done = True
        finally:
            await stream.close(done)
        return outputs, usage
