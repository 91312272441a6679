"""Test doubles for the API layer (used by this package's tests and by router/worker tests).

- :class:`CharTokenizer`: a lossless character-level tokenizer with GLM special tokens and a
  GLM-4.5-style chat template (rendered with jinja2), so prompts look like the real thing.
- :class:`ScriptedBackend`: a :class:`GenerateBackend` that streams scripted text pieces as
  :class:`RequestOutput` deltas and records every call, cancellation and close.
- :func:`make_app`: the shared routes over a backend, as a FastAPI app (use with TestClient).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2.sandbox
from fastapi import FastAPI

from pdserve.api.backend import ChatTokenizer, GenerateBackend, RequestContext
from pdserve.api.errors import BodySizeLimitMiddleware, install_error_handlers
from pdserve.api.native_serving import NativeServing
from pdserve.api.routes import api_router
from pdserve.api.serving import OpenAIServing
from pdserve.engine.outputs import RequestOutput, TokenLogprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import PdserveError

GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
)

GLM45_STYLE_TEMPLATE = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>\n# Tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}<|system|>\n{{ m.content }}"
    "{% elif m.role == 'user' %}<|user|>\n{{ m.content }}"
    "{% elif m.role == 'assistant' %}<|assistant|>"
    "{% if m.reasoning_content and clear_thinking is defined and not clear_thinking %}"
    "\n<think>{{ m.reasoning_content }}</think>{% else %}\n<think></think>{% endif %}"
    "{% if m.content %}\n{{ m.content }}{% endif %}"
    "{% for tc in m.tool_calls or [] %}\n<tool_call>{{ tc.function.name }}\n"
    "{% for k, v in tc.function.arguments.items() %}<arg_key>{{ k }}</arg_key>\n"
    "<arg_value>{{ v if v is string else v | tojson }}</arg_value>\n{% endfor %}</tool_call>"
    "{% endfor %}"
    "{% elif m.role == 'tool' %}<|observation|>\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}\n<think></think>{% endif %}"
    "{% endif %}"
)


class CharTokenizer:
    """One id per special token, ``ord(c) + len(specials)`` per other character (lossless)."""

    def __init__(
        self, template: str = GLM45_STYLE_TEMPLATE, specials: Sequence[str] = GLM_SPECIAL_TOKENS
    ) -> None:
        self.specials = list(specials)
        self._special_ids = {s: i for i, s in enumerate(self.specials)}
        self._offset = len(self.specials)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment()
        self._template = env.from_string(template)
        self.eos_token_ids = (
            [self._special_ids["<|endoftext|>"]] if "<|endoftext|>" in self._special_ids else []
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            else:
                ids.extend(ord(c) + self._offset for c in part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.specials[i] if i < self._offset else chr(i - self._offset) for i in ids)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        return self._template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )


@dataclass
class BackendCall:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    ctx: RequestContext
    closed: bool = False
    cancelled_seen: bool = False


@dataclass
class ScriptedBackend:
    """Streams ``pieces`` (one delta each; token ids from ``tokenizer``) then finishes.

    ``finish_reason``/``matched_stop`` go on the last delta. ``error_at``: raise ``error`` before
    yielding that piece index. ``delay_s``: sleep before each piece. ``hang_at``: block forever
    (until cancelled) before that piece. Logprobs are synthesised when the params ask for them.
    """

    tokenizer: ChatTokenizer
    pieces: list[str] = field(default_factory=lambda: ["Hello", " world"])
    finish_reason: str = "stop"
    matched_stop: int | str | None = None
    cached_tokens: int = 0
    error_at: int | None = None
    error: Exception = field(default_factory=lambda: PdserveError("scripted failure"))
    delay_s: float = 0.0
    hang_at: int | None = None
    omit_final: bool = False
    calls: list[BackendCall] = field(default_factory=list)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, ctx: RequestContext
    ) -> AsyncIterator[RequestOutput]:
        call = BackendCall(request_id, list(prompt_ids), params, ctx)
        self.calls.append(call)
        produced = 0
        try:
            n = len(self.pieces)
            for i, piece in enumerate(self.pieces):
                if self.error_at == i:
                    raise self.error
                if self.hang_at == i:
                    await asyncio.Event().wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                ids = self.tokenizer.encode(piece)
                produced += len(ids)
                last = i == n - 1 and not self.omit_final
                yield RequestOutput(
                    request_id=request_id,
                    new_token_ids=ids,
                    new_text=piece,
                    finished=last,
                    finish_reason=self.finish_reason if last else None,
                    matched_stop=self.matched_stop if last else None,
                    new_logprobs=self._logprobs(ids, params),
                    num_prompt_tokens=len(prompt_ids),
                    num_output_tokens=produced,
                    num_cached_tokens=self.cached_tokens,
                )
        finally:
            call.closed = True
            call.cancelled_seen = ctx.cancelled

    @staticmethod
    def _logprobs(ids: list[int], params: SamplingParams) -> list[TokenLogprob] | None:
        if params.logprobs is None:
            return None
        out = []
        for j, t in enumerate(ids):
            lp = -0.1 * (j + 1)
            top = [(t, lp)] + [(t + k, lp - k) for k in range(1, params.logprobs)]
            out.append(TokenLogprob(token_id=t, logprob=lp, top=top[: params.logprobs]))
        return out


def make_app(
    backend: GenerateBackend,
    tokenizer: ChatTokenizer | None = None,
    *,
    model: str = "glm-test",
    model_max_len: int = 4096,
    max_body_bytes: int = 1 << 20,
    **serving_kwargs: Any,
) -> FastAPI:
    """A FastAPI app with the shared routes, error handlers and body limit over ``backend``."""
    tok = tokenizer or CharTokenizer()
    serving = OpenAIServing(
        backend, tok, served_model_name=model, model_max_len=model_max_len, **serving_kwargs
    )
    native = NativeServing(backend, tok, served_model_name=model, model_max_len=model_max_len)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(api_router(serving, native=native))
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    return app
