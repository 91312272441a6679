"""Request models: OpenAI ``/v1/chat/completions`` and ``/v1/completions``, SGLang ``/generate``.

Wire rules (what OpenAI-compatible servers do): unknown top-level fields are accepted and ignored
(they are kept in ``model_extra`` so a backend can see them); wrong types and out-of-range values
are a 400 naming the field (validation is strict: ``"0.5"`` is not a number). Semantic checks that
pydantic cannot express raise :class:`~pdserve.errors.InvalidRequestError` directly.

Response and stream-chunk models live in :mod:`pdserve.api.responses`; the serving hot path builds
plain dicts with the same shape and never constructs models per token.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 64
MAX_BOOTSTRAP_ROOM = 2**63 - 1

_STRICT_IGNORE = ConfigDict(strict=True, extra="ignore")
_STRICT_ALLOW = ConfigDict(strict=True, extra="allow")


class _Part(BaseModel):
    model_config = _STRICT_IGNORE


# ---------------------------------------------------------------------------------------- chat


class TextContentPart(_Part):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Part):
    name: str
    # OpenAI sends a JSON string; some clients send the object itself. Both are accepted.
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Part):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"content is required for role {self.role!r}")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are only allowed on assistant messages")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined with newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class FunctionDef(_Part):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Part):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(_Part):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]


StopField = str | list[str] | None


class _SamplingFields(BaseModel):
    """Fields shared by the chat and completion requests."""

    model_config = _STRICT_ALLOW

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: StopField = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: str | None = None
    rid: str | None = None
    # SGLang PD extras, added by a PD router to the body it sends to both workers.
    bootstrap_host: str | None = None
    bootstrap_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    bootstrap_room: Annotated[int, Field(ge=0, le=MAX_BOOTSTRAP_ROOM)] | None = None

    def _check_common(self) -> None:
        if self.n != 1:
            raise InvalidRequestError(
                f"n must be 1: only one choice per request is supported, got {self.n}", param="n"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise InvalidRequestError(f"{name} is not supported (must be 0)", param=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        stops = self.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop"
            )
        if any(not s for s in stops):
            raise InvalidRequestError("stop sequences must be non-empty strings", param="stop")
        if self.seed is not None and self.seed < 0:
            raise InvalidRequestError(f"seed must be a non-negative integer, got {self.seed}", param="seed")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = True

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        self._check_common()
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequestError(
                f"response_format type {self.response_format.type!r} is not supported (only 'text')",
                param="response_format",
            )
        for key in ("enable_thinking", "clear_thinking"):
            value = (self.chat_template_kwargs or {}).get(key)
            if value is not None and not isinstance(value, bool):
                raise InvalidRequestError(
                    f"chat_template_kwargs.{key} must be a boolean", param=f"chat_template_kwargs.{key}"
                )
        return self

    @property
    def max_output_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None (off), 0 (chosen token only) or k (top k too)."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------------------------- completions


class CompletionRequest(_SamplingFields):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        self._check_common()
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of must be 1", param="best_of")
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str | list) and len(self.prompt) > 1:
            raise InvalidRequestError(
                "batched prompts are not supported: send one prompt per request", param="prompt"
            )
        return self

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or token ids (a one-element batch is unwrapped)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        first = p[0]
        if isinstance(first, str):
            return first
        if isinstance(first, list):
            if not first:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            return [int(t) for t in first]
        return [int(t) for t in p if isinstance(t, int)]


# ------------------------------------------------------------------------------- SGLang native


class NativeSamplingParams(_Part):
    """SGLang ``sampling_params`` of ``/generate`` (unsupported knobs must keep their neutral value)."""

    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    stop: StopField = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: Annotated[int, Field(ge=0)] | None = None
    seed: Annotated[int, Field(ge=0)] | None = None
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> NativeSamplingParams:
        neutral: dict[str, Any] = {
            "n": 1,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "repetition_penalty": 1.0,
            "min_new_tokens": 0,
            "json_schema": None,
            "regex": None,
            "ebnf": None,
            "structural_tag": None,
            "no_stop_trim": False,
        }
        for name, value in neutral.items():
            if getattr(self, name) != value:
                raise InvalidRequestError(
                    f"sampling_params.{name} is not supported (must be {value!r})",
                    param=f"sampling_params.{name}",
                )
        if self.logit_bias:
            raise InvalidRequestError(
                "sampling_params.logit_bias is not supported", param="sampling_params.logit_bias"
            )
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class GenerateRequest(BaseModel):
    """SGLang ``POST /generate`` (single request; batches are rejected with a clear 400)."""

    model_config = _STRICT_ALLOW

    text: str | list[str] | None = None
    input_ids: list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]] | None = None
    sampling_params: NativeSamplingParams | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False
    rid: str | None = None
    bootstrap_host: str | None = None
    bootstrap_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    bootstrap_room: Annotated[int, Field(ge=0, le=MAX_BOOTSTRAP_ROOM)] | None = None
    # pdserve extension (real SGLang ignores it): stream text/ids/logprobs as deltas instead of the
    # cumulative default. None = the server's default.
    incremental_streaming_output: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequestError("exactly one of text and input_ids must be given", param="text")
        if isinstance(self.text, list) or (self.input_ids and isinstance(self.input_ids[0], list)):
            raise InvalidRequestError(
                "batched /generate requests are not supported: send one per request",
                param="text" if self.text is not None else "input_ids",
            )
        if self.input_ids is not None and not self.input_ids:
            raise InvalidRequestError("input_ids must not be empty", param="input_ids")
        if self.top_logprobs_num and not self.return_logprob:
            raise InvalidRequestError("top_logprobs_num requires return_logprob", param="top_logprobs_num")
        return self

    def token_ids(self) -> list[int] | None:
        if self.input_ids is None:
            return None
        return [t for t in self.input_ids if isinstance(t, int)]


# ------------------------------------------------------------------------------------- parsing

M = TypeVar("M", bound=BaseModel)
_TYPE_TAG = re.compile(r"^[A-Z]|\[|^(str|int|float|bool|none|dict|list)$")


def error_param(loc: tuple[int | str, ...]) -> str:
    """``('messages', 0, 'content')`` -> ``messages[0].content`` (pydantic union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "body" and not out:
            continue
        elif not _TYPE_TAG.search(part):
            out += f".{part}" if out else part
    return out


def validation_error_to_invalid(errors: list[Any]) -> InvalidRequestError:
    """Turn pydantic error dicts into one readable 400 naming the most specific offending field
    (for a union, the member error that got deepest into the value)."""
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", err.get("msg", ""))
            return InvalidRequestError(f"malformed JSON body: {detail}", param=None)
    items = sorted(
        ((error_param(tuple(err.get("loc", ()))), str(err.get("msg", "invalid value"))) for err in errors),
        key=lambda item: -item[0].count(".") - item[0].count("["),
    )
    parts: list[str] = []
    for param, msg in items:
        line = f"{param or 'body'}: {msg}"
        if line not in parts:
            parts.append(line)
    more = f" (and {len(parts) - 3} more errors)" if len(parts) > 3 else ""
    return InvalidRequestError("; ".join(parts[:3]) + more, param=items[0][0] or None if items else None)


def parse_request(raw: bytes, model: type[M]) -> M:
    """Parse a JSON request body into ``model``; every client mistake becomes a 400."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"malformed JSON body: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error_to_invalid(exc.errors(include_url=False)) from exc
