"""Chat templates rendered exactly as HF transformers' ``apply_chat_template`` renders them.

Transformers is a test-only dependency, so this module reproduces its rendering contract with
jinja2 alone:

1. Environment: ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
   ``loopcontrols`` extension and a ``{% generation %}`` tag that renders its body unchanged; the
   ``tojson`` filter is ``json.dumps`` (no HTML escaping; ``ensure_ascii``, ``indent``,
   ``separators`` and ``sort_keys`` options); globals ``raise_exception``, ``strftime_now``, a
   ``dict`` constructor and a ``namespace`` that refuses underscore-prefixed attributes.
2. Inputs: messages, tools and template kwargs are rebuilt out of plain JSON types (pydantic
   models are dumped, other objects become ``"<TypeName>"``); ``None``-valued message keys are
   dropped; a message's reasoning given as ``reasoning_content``, ``thinking`` or ``reasoning``
   is exposed under both ``reasoning_content`` and ``thinking``.
3. Render with ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's
   named special tokens (``eos_token``, ...) and the caller's kwargs (which win).

Every template failure (syntax, undefined access, ``raise_exception``) becomes
:class:`~pdserve.errors.InvalidRequestError` carrying the template's message.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
RESERVED_TEMPLATE_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders the body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a plain class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attribute names (sandbox hardening)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def make_environment() -> ImmutableSandboxedEnvironment:
    """A fresh sandboxed environment configured like transformers' chat-template environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def plain_data(value: Any) -> Any:
    """A deep copy of ``value`` made of JSON types only (what a sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return plain_data(dump())
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return plain_data(item())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """Messages as plain dicts without ``None`` values, reasoning aliased as transformers does."""
    if isinstance(messages, (str, bytes, Mapping)):
        raise InvalidRequestError("messages must be a list of message objects", param="messages")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(messages):
        dump = getattr(raw, "model_dump", None)
        msg = dump() if callable(dump) else raw
        if not isinstance(msg, Mapping):
            raise InvalidRequestError(
                f"messages[{i}] must be an object, got {type(msg).__name__}", param="messages"
            )
        plain = plain_data({k: v for k, v in msg.items() if v is not None})
        reasoning = next((plain[k] for k in REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    if not out:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    return out


def parse_tool_call_arguments(messages: list[dict[str, Any]]) -> None:
    """In place: OpenAI sends ``tool_calls[].function.arguments`` as a JSON string; GLM templates
    iterate over it as an object (SGLang and vLLM parse it before templating too)."""
    for i, msg in enumerate(messages):
        calls = msg.get("tool_calls")
        if not isinstance(calls, list):
            continue
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
                continue
            text = fn["arguments"]
            try:
                fn["arguments"] = json.loads(text) if text.strip() else {}
            except ValueError as exc:
                raise InvalidRequestError(
                    f"messages[{i}].tool_calls: arguments are not valid JSON: {exc}", param="messages"
                ) from exc


class ChatTemplateRenderer:
    """Compiles templates once (per instance) and renders conversations."""

    def __init__(self) -> None:
        self._env = make_environment()
        self._compiled: dict[str, jinja2.Template] = {}
        self._lock = threading.Lock()

    def compile(self, source: str) -> jinja2.Template:
        """Compile (cached); a syntax error raises :class:`InvalidRequestError`."""
        template = self._compiled.get(source)
        if template is None:
            try:
                template = self._env.from_string(source)
            except jinja2.TemplateError as exc:
                raise InvalidRequestError(f"chat template error: {exc}") from exc
            with self._lock:  # bounded: per-request templates must not grow it without limit
                while len(self._compiled) >= 16:
                    self._compiled.pop(next(iter(self._compiled)))
                self._compiled[source] = template
        return template

    def render(
        self,
        source: str,
        messages: Iterable[Any],
        *,
        tools: Iterable[Any] | None = None,
        documents: Iterable[Any] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        special_tokens: Mapping[str, str] | None = None,
        parse_tool_arguments: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        kwargs = dict(template_kwargs or {})
        clash = RESERVED_TEMPLATE_NAMES.intersection(kwargs)
        if clash:
            raise InvalidRequestError(
                f"chat template kwargs may not override {sorted(clash)}", param="chat_template_kwargs"
            )
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt cannot both be set",
                param="continue_final_message",
            )
        chat = normalize_messages(messages)
        if parse_tool_arguments:
            parse_tool_call_arguments(chat)
        tool_schemas = None
        if tools is not None:
            tool_schemas = plain_data(list(tools))
            for j, tool in enumerate(tool_schemas):
                if not isinstance(tool, dict):
                    raise InvalidRequestError(f"tools[{j}] must be a JSON object", param="tools")
        final_text = ""
        if continue_final_message:
            final_text = self._tag_final_message(chat)
        variables: dict[str, Any] = {**dict(special_tokens or {}), **plain_data(kwargs)}
        template = self.compile(source)
        try:
            rendered = template.render(
                messages=chat,
                tools=tool_schemas,
                documents=plain_data(list(documents)) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template error: {exc}", param="messages") from exc
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            raise InvalidRequestError(f"chat template error: {exc!r}", param="messages") from exc
        if continue_final_message:
            rendered = self._cut_at_tag(rendered, final_text)
        return rendered

    @staticmethod
    def _tag_final_message(chat: list[dict[str, Any]]) -> str:
        final = chat[-1].get("content")
        if isinstance(final, str):
            chat[-1]["content"] = final + _CONTINUE_TAG
            return final
        if isinstance(final, list):
            for part in reversed(final):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    text: str = part["text"]
                    part["text"] = text + _CONTINUE_TAG
                    return text
        raise InvalidRequestError(
            "continue_final_message is set but the final message has no text to continue",
            param="continue_final_message",
        )

    @staticmethod
    def _cut_at_tag(rendered: str, final_text: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise InvalidRequestError(
                "continue_final_message is set but the template dropped the final message",
                param="continue_final_message",
            )
        loc = rendered.rindex(tag)
        if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:loc]
        # The template trimmed the tag's trailing space, so trailing spacing is not trustworthy.
        return rendered[:loc].rstrip()
