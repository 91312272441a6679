"""Tool-call parsers ``glm45`` and ``glm47`` (streaming and non-streaming).

GLM-4.5/4.6 write ``<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n…</tool_call>``;
GLM-4.7 writes the same without the newlines. One lenient state machine reads both (a name ends at
a newline, ``<arg_key>`` or ``</tool_call>``; whitespace between tags is ignored); the formats
differ only in what a forced ``tool_choice`` appends to the prompt.

Streaming lifecycle of one parser (one per request):

1. ``text``: content passes through; a suffix that may start ``<tool_call>`` and trailing
   whitespace are held back. Whitespace that only separates calls from each other or from the
   start/end of the output is dropped; whitespace between two pieces of content is kept.
2. ``<tool_call>`` -> ``name``: held until the name ends, then the first delta of the call is
   emitted: ``{index, id: "call_…", type: "function", function: {name, arguments: ""}}``.
3. ``args``/``key``/``wait_value``/``value``: argument fragments are emitted as
   ``{index, function: {arguments}}``; their concatenation is a compact JSON object. String-typed
   values stream as they arrive (JSON-escaped); other values are emitted when complete.
4. ``</tool_call>`` closes the object and returns to ``text``; several calls may follow.
5. :meth:`ToolCallParser.finish` flushes held content and closes a call cut off by a length limit
   so its arguments still parse.

Markup never reaches ``content`` and calls are never duplicated. Unknown tool names are reported as
the model wrote them (the client owns the tool loop and can answer with an error) and logged; with
``parallel_tool_calls=false`` only the first call is reported. The non-streaming
:func:`parse_tool_calls` runs the same machine over the whole text.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from pdserve.api.reasoning import held_suffix_len
from pdserve.api.tools import EMPTY_TOOLSET, ToolSet, convert_value
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
KEY_OPEN = "<arg_key>"
KEY_CLOSE = "</arg_key>"
VALUE_OPEN = "<arg_value>"
VALUE_CLOSE = "</arg_value>"

_TEXT, _NAME, _ARGS, _KEY, _WAIT_VALUE, _VALUE = range(6)


@dataclass(frozen=True, slots=True)
class ToolCallFormat:
    """How a format writes a call; used to build forced ``tool_choice`` prompt suffixes."""

    name: str
    call_prefix: str  # what precedes the name when the prompt forces a call
    name_sep: str  # what follows the name before the first argument

    def forced_prefix(self, function_name: str | None) -> str:
        """Prompt suffix for ``tool_choice`` required (``None``) or a named function."""
        if function_name is None:
            return self.call_prefix
        return f"{self.call_prefix}{function_name}{self.name_sep}"


TOOL_FORMATS: dict[str, ToolCallFormat] = {
    "glm45": ToolCallFormat("glm45", call_prefix="\n" + CALL_OPEN, name_sep="\n"),
    "glm47": ToolCallFormat("glm47", call_prefix=CALL_OPEN, name_sep=""),
}


def get_tool_format(name: str) -> ToolCallFormat:
    try:
        return TOOL_FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown tool-call parser {name!r}; known: {sorted(TOOL_FORMATS)}") from None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _escape(fragment: str) -> str:
    """JSON string-body escaping; per-character, so fragments concatenate to the whole."""
    return orjson.dumps(fragment).decode()[1:-1]


def _dump(value: Any) -> str:
    return orjson.dumps(value).decode()


class ToolCallParser:
    """Incremental GLM tool-call parser. ``feed(text)`` returns ``(content, tool_call_deltas)``."""

    def __init__(
        self,
        tools: ToolSet = EMPTY_TOOLSET,
        *,
        start: Literal["text", "name", "args"] = "text",
        forced_name: str | None = None,
        parallel_tool_calls: bool = True,
        id_factory: Callable[[], str] = new_call_id,
    ) -> None:
        self._tools = tools
        self._parallel = parallel_tool_calls
        self._new_id = id_factory
        self._buf = ""
        self._state = _TEXT
        self._pending_ws = ""  # whitespace before a call: kept only if more content follows
        self._after_call = False
        self._emitted = False  # any content emitted yet
        self._events: list[dict[str, Any]] = []
        self.num_calls = 0  # calls reported so far
        self._index = -1  # index of the call being parsed (reported or not)
        self._suppressed = False  # the current call is parsed but not reported
        self._call_name = ""
        self._num_args = 0
        self._key = ""
        self._value_is_string = False
        if start == "name":
            self._state = _NAME
        elif start == "args":
            if not forced_name:
                raise ConfigError("start='args' needs forced_name")
            self._start_call(forced_name)
            self._state = _ARGS

    @property
    def has_calls(self) -> bool:
        return self.num_calls > 0

    # ------------------------------------------------------------------------------- feeding

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        buf = self._buf + text if self._buf else text
        content: list[str] = []
        while True:
            state = self._state
            if state == _TEXT:
                idx = buf.find(CALL_OPEN)
                if idx < 0:
                    keep = held_suffix_len(buf, (CALL_OPEN,))
                    body = buf[: len(buf) - keep].rstrip()
                    self._emit_content(content, body)
                    buf = buf[len(body) :]
                    break
                before = buf[:idx]
                stripped = before.rstrip()
                self._emit_content(content, stripped)
                self._pending_ws += before[len(stripped) :]
                buf = buf[idx + len(CALL_OPEN) :]
                self._state = _NAME
            elif state == _NAME:
                end, skip = self._name_end(buf)
                if end < 0:
                    break
                self._start_call(buf[:end].strip())
                buf = buf[end + skip :]
                self._state = _ARGS
            elif state == _ARGS:
                k = buf.find(KEY_OPEN)
                c = buf.find(CALL_CLOSE)
                if c >= 0 and (k < 0 or c < k):
                    self._end_call()
                    buf = buf[c + len(CALL_CLOSE) :]
                elif k >= 0:
                    buf = buf[k + len(KEY_OPEN) :]
                    self._state = _KEY
                else:
                    buf = buf[len(buf) - held_suffix_len(buf, (KEY_OPEN, CALL_CLOSE)) :]
                    break
            elif state == _KEY:
                idx = buf.find(KEY_CLOSE)
                if idx < 0:
                    break
                self._key = buf[:idx].strip()
                buf = buf[idx + len(KEY_CLOSE) :]
                self._state = _WAIT_VALUE
            elif state == _WAIT_VALUE:
                v = buf.find(VALUE_OPEN)
                c = buf.find(CALL_CLOSE)
                if c >= 0 and (v < 0 or c < v):  # a key without a value: drop the key
                    self._end_call()
                    buf = buf[c + len(CALL_CLOSE) :]
                elif v >= 0:
                    buf = buf[v + len(VALUE_OPEN) :]
                    self._value_is_string = self._tools.is_string_param(self._call_name, self._key)
                    if self._value_is_string:
                        self._args(self._key_prefix() + '"')
                    self._state = _VALUE
                else:
                    buf = buf[len(buf) - held_suffix_len(buf, (VALUE_OPEN, CALL_CLOSE)) :]
                    break
            else:  # _VALUE
                idx = buf.find(VALUE_CLOSE)
                if idx < 0:
                    if self._value_is_string:
                        keep = held_suffix_len(buf, (VALUE_CLOSE,))
                        if len(buf) > keep:
                            self._args(_escape(buf[: len(buf) - keep]))
                            buf = buf[len(buf) - keep :]
                    break
                self._close_value(buf[:idx])
                buf = buf[idx + len(VALUE_CLOSE) :]
                self._state = _ARGS
        self._buf = buf
        return "".join(content), self._take_events()

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """End of output: flush held content; close a truncated call so its arguments parse."""
        buf, self._buf = self._buf, ""
        content: list[str] = []
        state = self._state
        if state == _TEXT:
            self._emit_content(content, buf.rstrip() if self._index >= 0 else buf)
        elif state == _VALUE:
            self._close_value(buf)
            self._end_call()
        elif state != _NAME:  # _ARGS, _KEY, _WAIT_VALUE: the pending key has no value; drop it
            self._end_call()
        # _NAME: a call cut off before its name ended is dropped (markup never leaks).
        self._state = _TEXT
        return "".join(content), self._take_events()

    # ------------------------------------------------------------------------------- helpers

    @staticmethod
    def _name_end(buf: str) -> tuple[int, int]:
        """Where the function name ends and how much of the terminator to consume."""
        best, skip = -1, 0
        for term, consume in (("\n", 1), (KEY_OPEN, 0), (CALL_CLOSE, 0)):
            i = buf.find(term)
            if i >= 0 and (best < 0 or i < best):
                best, skip = i, consume
        return best, skip

    def _emit_content(self, out: list[str], text: str) -> None:
        if not text:
            return
        if self._after_call and not self._emitted:
            text = text.lstrip()  # content that starts after a call: drop the separator
        elif self._pending_ws:
            text = self._pending_ws + text
        self._pending_ws = ""
        if text:
            out.append(text)
            self._emitted = True

    def _start_call(self, name: str) -> None:
        self._index += 1
        self._call_name = name
        self._num_args = 0
        self._suppressed = not name or (not self._parallel and self.num_calls >= 1)
        if self._suppressed:
            logger.debug("dropping tool call %r (empty name or parallel_tool_calls=false)", name)
            return
        if name not in self._tools:
            logger.debug("model called unknown tool %r; reporting it as written", name)
        self._events.append(
            {
                "index": self.num_calls,
                "id": self._new_id(),
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        )
        self.num_calls += 1

    def _key_prefix(self) -> str:
        sep = "{" if self._num_args == 0 else ","
        self._num_args += 1
        return f"{sep}{_dump(self._key)}:"

    def _close_value(self, raw: str) -> None:
        if self._value_is_string:
            self._args(_escape(raw) + '"')
        else:
            self._args(self._key_prefix() + _dump(convert_value(raw, as_string=False)))

    def _end_call(self) -> None:
        self._args("}" if self._num_args else "{}")
        self._state = _TEXT
        self._after_call = True
        self._suppressed = False

    def _args(self, fragment: str) -> None:
        if self._suppressed or not fragment:
            return
        events = self._events
        index = self.num_calls - 1
        last = events[-1] if events else None
        if last is not None and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += fragment  # coalesce fragments within one feed
        else:
            events.append({"index": index, "function": {"arguments": fragment}})

    def _take_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


def parse_tool_calls(
    text: str,
    tools: ToolSet = EMPTY_TOOLSET,
    *,
    start: Literal["text", "name", "args"] = "text",
    forced_name: str | None = None,
    parallel_tool_calls: bool = True,
    id_factory: Callable[[], str] = new_call_id,
) -> tuple[str, list[dict[str, Any]]]:
    """Non-streaming: ``(content, [{"id", "type": "function", "function": {"name", "arguments"}}])``."""
    parser = ToolCallParser(
        tools,
        start=start,
        forced_name=forced_name,
        parallel_tool_calls=parallel_tool_calls,
        id_factory=id_factory,
    )
    c1, d1 = parser.feed(text)
    c2, d2 = parser.finish()
    return c1 + c2, merge_tool_call_deltas(d1 + d2)


def merge_tool_call_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold streamed deltas into complete OpenAI tool calls (by ``index``)."""
    calls: list[dict[str, Any]] = []
    for d in deltas:
        i = d["index"]
        if i == len(calls):
            calls.append(
                {
                    "id": d.get("id", ""),
                    "type": "function",
                    "function": {"name": d["function"].get("name", ""), "arguments": ""},
                }
            )
        calls[i]["function"]["arguments"] += d["function"].get("arguments") or ""
    return calls
