"""OpenAI serving on top of a :class:`GenerateBackend`: ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/models``.

Request lifecycle (chat; completions are the same without templating and parsing):

1. Validate: served model name (404), tools and ``tool_choice`` (400), context length (400).
2. Render the prompt (:class:`ChatRenderer`), build :class:`SamplingParams`, fill the
   :class:`RequestContext` and call ``backend.generate``.
3. Streaming: the first backend output is awaited *before* the SSE stream is returned, so failures
   before any output (overloaded, bad worker, timeout) are real HTTP statuses a router can retry.
   Then ``data: {chunk}`` per delta (role first; reasoning_content / content / tool_calls deltas;
   logprobs), a final chunk with ``finish_reason``, a usage chunk with ``include_usage``, then
   ``data: [DONE]``. Errors after the first byte become an error event before ``[DONE]``.
4. Non-streaming: collect all deltas, parse reasoning and tool calls once, answer one JSON body.
5. Waits, cancellation and cleanup follow :mod:`pdserve.api.serving_base`.

The hot path builds plain dicts and serialises them with orjson; no pydantic model is constructed
per token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from pdserve.api.backend import ChatTokenizer, GenerateBackend, RequestContext
from pdserve.api.backend_stream import BackendStream
from pdserve.api.chat import ChatOutputProcessor, ChatPrompt, ChatRenderer
from pdserve.api.logprobs import CompletionLogprobsBuilder, TokenTexts, chat_logprobs
from pdserve.api.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.api.reasoning import Glm45ReasoningParser, get_reasoning_parser
from pdserve.api.serving_base import ServingBase, UsageCounter
from pdserve.api.sse import sse_event
from pdserve.api.tool_parsers import get_tool_format, merge_tool_call_deltas
from pdserve.api.tools import ToolValidator
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

ReasoningCls = type[Glm45ReasoningParser] | None


class OpenAIServing(ServingBase):
    """Backend-agnostic OpenAI endpoints. One instance per server; safe for concurrent requests."""

    def __init__(
        self,
        backend: GenerateBackend,
        tokenizer: ChatTokenizer,
        *,
        served_model_name: str,
        model_max_len: int,
        reasoning_parser: str | None = "glm45",
        tool_parser: str | None = "glm45",
        default_max_tokens: int | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
        owned_by: str = "sglang",
        first_output_timeout_s: float = 120.0,
        output_timeout_s: float = 60.0,
        request_timeout_s: float | None = None,
        close_timeout_s: float = 5.0,
        tool_schema_cache_size: int = 1024,
    ) -> None:
        self._tokenizer = tokenizer
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
        self._reasoning_cls: ReasoningCls = (
            get_reasoning_parser(reasoning_parser) if reasoning_parser else None
        )
        self._renderer = ChatRenderer(
            tokenizer,
            tool_format=get_tool_format(tool_parser) if tool_parser else None,
            tool_validator=ToolValidator(tool_schema_cache_size),
        )
        self._owned_by = owned_by
        self._texts = TokenTexts(tokenizer)
        self._created = int(time.time())

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": self._owned_by,
            "root": self.model_name,
            "max_model_len": self.model_max_len,
        }
        return {"object": "list", "data": [card]}

    def _request_params(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        max_tokens: int,
        logprobs: int | None,
        skip_special_tokens: bool,
    ) -> SamplingParams:
        """Server defaults, the request's sampling values, then its stop/limit fields."""
        overrides = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "min_p": req.min_p,
            "seed": req.seed,
        }
        return self._sampling_params(
            overrides,
            max_tokens=max_tokens,
            stop=req.stop_list(),
            stop_token_ids=list(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=skip_special_tokens,
        )

    # -------------------------------------------------------------------------------- chat

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext | None = None
    ) -> dict[str, Any] | AsyncIterator[bytes]:
        self._check_model(req.model)
        prompt = self._renderer.render(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(req.max_output_tokens, len(prompt.ids), param)
        parsing = prompt.parse_tools or (self._reasoning_cls is not None and req.separate_reasoning)
        skip = req.skip_special_tokens if req.skip_special_tokens is not None else not parsing
        params = self._request_params(req, max_tokens, req.num_logprobs, skip)
        ctx = self._prepare_ctx(ctx, req, prompt.text)
        response_id = f"chatcmpl-{ctx.request_id}"
        reasoning_cls = self._reasoning_cls if req.separate_reasoning else None
        it = self._backend.generate(ctx.request_id, prompt.ids, params, ctx=ctx)
        if not req.stream:
            outputs, usage = await self._collect(self._open(it, ctx), len(prompt.ids))
            return self._chat_response(req, prompt, reasoning_cls, response_id, outputs, usage)
        stream = self._open(it, ctx)
        first = await self._prime(stream)
        events = self._chat_events(req, prompt, reasoning_cls, response_id, stream, first)
        return self._sse(stream, events, "chat")

    def _chat_response(
        self,
        req: ChatCompletionRequest,
        prompt: ChatPrompt,
        reasoning_cls: ReasoningCls,
        response_id: str,
        outputs: list[RequestOutput],
        usage: UsageCounter,
    ) -> dict[str, Any]:
        proc = ChatOutputProcessor(prompt, reasoning_cls)
        r1, c1, d1 = proc.feed("".join(o.new_text for o in outputs))
        r2, c2, d2 = proc.finish()
        reasoning, content, calls = r1 + r2, c1 + c2, merge_tool_call_deltas(d1 + d2)
        last = outputs[-1]
        logprobs = None
        if req.logprobs:
            items = [lp for o in outputs for lp in (o.new_logprobs or ())]
            logprobs = {"content": chat_logprobs(self._texts, items, req.top_logprobs or 0)}
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not calls else None,
            "reasoning_content": reasoning or None,
            "tool_calls": calls or None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self._finish_reason(last, bool(calls)),
            "matched_stop": last.matched_stop,
        }
        return _response(response_id, "chat.completion", self.model_name, choice, usage)

    async def _chat_events(
        self,
        req: ChatCompletionRequest,
        prompt: ChatPrompt,
        reasoning_cls: ReasoningCls,
        response_id: str,
        stream: BackendStream,
        first: RequestOutput,
    ) -> AsyncGenerator[bytes, None]:
        proc = ChatOutputProcessor(prompt, reasoning_cls)
        usage = UsageCounter(len(prompt.ids))
        want_lp, top_k = req.logprobs, req.top_logprobs or 0
        chunks = _Chunks(response_id, "chat.completion.chunk", "delta", self.model_name, req.include_usage)
        chunk = chunks.event
        yield chunk({"role": "assistant", "content": ""})
        out = first
        while True:
            usage.add(out)
            reasoning, content, calls = proc.feed(out.new_text) if out.new_text else ("", "", [])
            if out.finished:
                r2, c2, d2 = proc.finish()
                reasoning, content, calls = reasoning + r2, content + c2, calls + d2
            delta: dict[str, Any] = {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = calls
            lp = None
            if want_lp and out.new_logprobs:
                lp = {"content": chat_logprobs(self._texts, out.new_logprobs, top_k)}
            if out.finished:
                finish = self._finish_reason(out, proc.has_tool_calls)
                yield chunk(delta, lp, finish, out.matched_stop)
                if chunks.include_usage:
                    yield chunks.usage(usage)
                return
            if delta or lp is not None:
                yield chunk(delta, lp)
            out = await stream.next(self._output_timeout)

    # ------------------------------------------------------------------------- completions

    async def completion(
        self, req: CompletionRequest, ctx: RequestContext | None = None
    ) -> dict[str, Any] | AsyncIterator[bytes]:
        self._check_model(req.model)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self._tokenizer.encode(prompt, add_special_tokens=False)
            if not prompt_ids:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
        else:
            prompt_text, prompt_ids = None, prompt
        max_tokens = self._max_tokens(req.max_tokens, len(prompt_ids), "max_tokens")
        skip = req.skip_special_tokens if req.skip_special_tokens is not None else True
        params = self._request_params(req, max_tokens, req.logprobs, skip)
        ctx = self._prepare_ctx(ctx, req, prompt_text)
        response_id = f"cmpl-{ctx.request_id}"
        echo = ""
        if req.echo:
            echo = prompt_text if prompt_text is not None else self._tokenizer.decode(prompt_ids)
        lp_builder = CompletionLogprobsBuilder(self._texts, req.logprobs or 0, start_offset=len(echo))
        it = self._backend.generate(ctx.request_id, prompt_ids, params, ctx=ctx)
        if not req.stream:
            outputs, usage = await self._collect(self._open(it, ctx), len(prompt_ids))
            last = outputs[-1]
            logprobs = None
            if req.logprobs is not None:
                logprobs = lp_builder.build([lp for o in outputs for lp in (o.new_logprobs or ())])
            choice = {
                "index": 0,
                "text": echo + "".join(o.new_text for o in outputs),
                "logprobs": logprobs,
                "finish_reason": self._finish_reason(last, False),
                "matched_stop": last.matched_stop,
            }
            return _response(response_id, "text_completion", self.model_name, choice, usage)
        stream = self._open(it, ctx)
        first = await self._prime(stream)
        events = self._completion_events(req, response_id, stream, first, echo, lp_builder, len(prompt_ids))
        return self._sse(stream, events, "completion")

    async def _completion_events(
        self,
        req: CompletionRequest,
        response_id: str,
        stream: BackendStream,
        first: RequestOutput,
        echo: str,
        lp_builder: CompletionLogprobsBuilder,
        prompt_len: int,
    ) -> AsyncGenerator[bytes, None]:
        usage = UsageCounter(prompt_len)
        want_lp = req.logprobs is not None
        chunks = _Chunks(response_id, "text_completion", "text", self.model_name, req.include_usage)
        chunk = chunks.event
        if echo:
            yield chunk(echo)
        out = first
        while True:
            usage.add(out)
            lp = lp_builder.build(out.new_logprobs or []) if want_lp else None
            if out.finished:
                yield chunk(out.new_text, lp, self._finish_reason(out, False), out.matched_stop)
                if chunks.include_usage:
                    yield chunks.usage(usage)
                return
            if out.new_text or (lp is not None and lp["tokens"]):
                yield chunk(out.new_text, lp)
            out = await stream.next(self._output_timeout)


class _Chunks:
    """The SSE chunks of one streamed answer: ``object`` is ``chat.completion.chunk`` (choices carry
    a ``delta``) or ``text_completion`` (choices carry ``text``)."""

    __slots__ = ("created", "field", "include_usage", "model", "object", "response_id")

    def __init__(self, response_id: str, obj: str, field: str, model: str, include_usage: bool) -> None:
        self.response_id = response_id
        self.object = obj
        self.field = field
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def event(self, value: Any, lp: Any = None, finish: str | None = None, matched: Any = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, self.field: value, "logprobs": lp, "finish_reason": finish}
        if finish is not None:
            choice["matched_stop"] = matched
        obj: dict[str, Any] = {
            "id": self.response_id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            obj["usage"] = None
        return sse_event(obj)

    def usage(self, usage: UsageCounter) -> bytes:
        """The ``include_usage`` chunk after the final one."""
        return sse_event(
            {
                "id": self.response_id,
                "object": self.object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage.to_dict(),
            }
        )


def _response(
    response_id: str, obj: str, model: str, choice: dict[str, Any], usage: UsageCounter
) -> dict[str, Any]:
    """A non-streamed answer's body."""
    return {
        "id": response_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage.to_dict(),
    }
