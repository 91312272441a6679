"""OpenAI chat request -> rendered prompt (text + ids) and how to parse the output.

1. Messages become template messages: ``developer`` -> ``system``; content parts joined; assistant
   turns keep ``reasoning_content`` and ``tool_calls`` with ``arguments`` decoded to a dict (the
   GLM template iterates them); tool results keep ``tool_call_id``.
2. Tools are validated (:mod:`pdserve.api.tools`). ``tool_choice``: ``none`` -> no tools in the
   prompt and no tool parsing; ``auto`` (default with tools); ``required`` -> the prompt ends with a
   forced ``<tool_call>`` and the parser starts inside a call (awaiting the name); a named
   function -> the prompt ends with ``<tool_call>NAME`` + the format's separator and the parser
   starts inside that call's arguments. A forced call renders with ``enable_thinking=false`` (a
   forced call and a think block cannot both come first).
3. ``chat_template_kwargs`` (``enable_thinking``, ``clear_thinking``, ...) pass through.
4. The reasoning parser's start state is read off the rendered generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import orjson

from pdserve.api.backend import ChatTokenizer
from pdserve.api.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from pdserve.api.reasoning import THINK_END, Glm45ReasoningParser, StartState, start_state_for_prompt
from pdserve.api.tool_parsers import ToolCallFormat, ToolCallParser
from pdserve.api.tools import EMPTY_TOOLSET, ToolSet, ToolValidator
from pdserve.errors import InvalidRequestError


@dataclass(slots=True)
class ChatPrompt:
    """A rendered chat prompt and the output-parsing plan that goes with it."""

    text: str
    ids: list[int]
    toolset: ToolSet = EMPTY_TOOLSET
    parse_tools: bool = False
    tool_start: Literal["text", "name", "args"] = "text"
    forced_name: str | None = None
    parallel_tool_calls: bool = True
    reasoning_start: StartState = "auto"


def to_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the dicts a (GLM) chat template consumes."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        if m.role == "assistant":
            if m.reasoning_content is not None:
                msg["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": tc.id or f"call_{i}_{j}",
                        "type": "function",
                        "function": {
                            "name": tc.function.name,
                            "arguments": _arguments_dict(
                                tc.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments"
                            ),
                        },
                    }
                    for j, tc in enumerate(m.tool_calls)
                ]
        elif m.role == "tool":
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
        elif m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _arguments_dict(arguments: str | dict[str, Any], param: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"tool call arguments are not valid JSON: {exc}", param=param) from exc
    if not isinstance(value, dict):
        raise InvalidRequestError("tool call arguments must be a JSON object", param=param)
    return value


class ChatRenderer:
    """Renders chat requests with one tokenizer; holds the per-server tool-schema cache."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        *,
        tool_format: ToolCallFormat | None,
        tool_validator: ToolValidator | None = None,
        assistant_marker: str = "<|assistant|>",
    ) -> None:
        self._tokenizer = tokenizer
        self._format = tool_format
        self._validator = tool_validator or ToolValidator()
        self._assistant_marker = assistant_marker

    def render(self, req: ChatCompletionRequest) -> ChatPrompt:
        tools = req.tools or []
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        forced: Literal["required", "named"] | None = None
        forced_name: str | None = None
        if isinstance(choice, NamedToolChoice):
            forced, forced_name = "named", choice.function.name
        elif choice == "required":
            forced = "required"
        if forced is not None:
            if not tools:
                raise InvalidRequestError("tool_choice requires a non-empty tools list", param="tool_choice")
            if self._format is None:
                raise InvalidRequestError(
                    "this server has no tool-call parser; tool_choice must be 'auto' or 'none'",
                    param="tool_choice",
                )

        toolset = EMPTY_TOOLSET
        if tools and choice != "none":
            toolset = self._validator.validate(tools)
        if forced_name is not None and forced_name not in toolset:
            raise InvalidRequestError(
                f"tool_choice names function {forced_name!r}, which is not in tools", param="tool_choice"
            )

        kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
        if forced is not None:
            kwargs["enable_thinking"] = False
        messages = to_template_messages(req.messages)
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=toolset.template_tools() or None, add_generation_prompt=True, **kwargs
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(
                f"chat template failed on these messages: {exc}", param="messages"
            ) from exc

        reasoning_start = start_state_for_prompt(text, self._assistant_marker)
        prompt = ChatPrompt(
            text=text,
            ids=[],
            toolset=toolset,
            parallel_tool_calls=req.parallel_tool_calls,
            parse_tools=self._format is not None and bool(toolset.tools),
            reasoning_start=reasoning_start,
        )
        if forced is not None and self._format is not None:
            if reasoning_start == "reasoning":
                prompt.text += THINK_END  # a template that ignores enable_thinking left it open
            prompt.text += self._format.forced_prefix(forced_name)
            prompt.reasoning_start = "content"
            prompt.tool_start = "name" if forced == "required" else "args"
            prompt.forced_name = forced_name
        prompt.ids = self._tokenizer.encode(prompt.text, add_special_tokens=False)
        return prompt


class ChatOutputProcessor:
    """Output text -> (reasoning_content, content, tool_call deltas): the reasoning parser first,
    then the tool-call parser on what is content. One instance per request (stateful)."""

    __slots__ = ("_reasoning", "_tools")

    def __init__(self, prompt: ChatPrompt, reasoning_cls: type[Glm45ReasoningParser] | None) -> None:
        self._reasoning = reasoning_cls(prompt.reasoning_start) if reasoning_cls is not None else None
        self._tools = (
            ToolCallParser(
                prompt.toolset,
                start=prompt.tool_start,
                forced_name=prompt.forced_name,
                parallel_tool_calls=prompt.parallel_tool_calls,
            )
            if prompt.parse_tools
            else None
        )

    @property
    def has_tool_calls(self) -> bool:
        return self._tools is not None and self._tools.has_calls

    def feed(self, text: str) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning, content = self._reasoning.feed(text) if self._reasoning is not None else ("", text)
        if self._tools is None:
            return reasoning, content, []
        if not content:
            return reasoning, "", []
        content, calls = self._tools.feed(content)
        return reasoning, content, calls

    def finish(self) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning, content = self._reasoning.finish() if self._reasoning is not None else ("", "")
        if self._tools is None:
            return reasoning, content, []
        c1, calls1 = self._tools.feed(content) if content else ("", [])
        c2, calls2 = self._tools.finish()
        return reasoning, c1 + c2, calls1 + calls2
