"""The ``glm45`` reasoning parser: ``<think>…</think>`` -> ``reasoning_content`` vs ``content``.

Streaming state machine (the non-streaming :func:`split_reasoning` runs the same machine over the
whole text, so both paths agree by construction):

1. Start state, decided from the rendered prompt by :func:`start_state_for_prompt`:
   ``reasoning`` (the prompt opened a think block: output starts inside it), ``content`` (the
   prompt already closed it, e.g. ``enable_thinking=false``: all output is content) or ``auto``
   (the model chooses: output starting with ``<think>`` is reasoning, anything else is content).
2. ``auto``: leading whitespace and a partial ``<think>`` are held until decided.
3. ``reasoning``: text is reasoning until ``</think>``; a suffix that may be the start of
   ``</think>`` is held back (never leaked), as is trailing whitespace (dropped at ``</think>``).
   Leading whitespace of the reasoning is dropped.
4. After ``</think>`` (or from a ``content`` start): leading whitespace dropped, then everything
   passes through as content.
5. :meth:`finish` flushes what was held (an unterminated think block stays reasoning).
"""

from __future__ import annotations

from typing import Literal

from pdserve.errors import ConfigError

THINK_START = "<think>"
THINK_END = "</think>"

StartState = Literal["auto", "reasoning", "content"]

_AUTO, _REASONING, _CONTENT_START, _CONTENT = range(4)


def held_suffix_len(s: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``s`` that is a proper prefix of one of ``tags`` (all of which
    start with ``<``): the part a streaming parser must hold back until the next delta decides it."""
    n = len(s)
    longest = max(len(t) for t in tags)
    pos = s.find("<", max(0, n - longest + 1))
    while pos != -1:
        tail = s[pos:]
        for tag in tags:
            if len(tail) < len(tag) and tag.startswith(tail):
                return n - pos
        pos = s.find("<", pos + 1)
    return 0


def start_state_for_prompt(prompt_text: str, assistant_marker: str = "<|assistant|>") -> StartState:
    """Where the output starts, judged from the generation prompt's last assistant turn."""
    idx = prompt_text.rfind(assistant_marker)
    tail = prompt_text[idx:] if idx >= 0 else prompt_text[-64:]
    last_open = tail.rfind(THINK_START)
    last_close = tail.rfind(THINK_END)
    if last_open > last_close:
        return "reasoning"
    if last_close >= 0:
        return "content"
    return "auto"


class Glm45ReasoningParser:
    """Incremental splitter; one instance per request. ``feed`` returns ``(reasoning, content)``."""

    name = "glm45"

    __slots__ = ("_buf", "_reasoning_started", "_state")

    def __init__(self, start: StartState = "auto") -> None:
        self._state = {"auto": _AUTO, "reasoning": _REASONING, "content": _CONTENT_START}[start]
        self._buf = ""
        self._reasoning_started = False

    @property
    def in_reasoning(self) -> bool:
        return self._state in (_AUTO, _REASONING)

    def feed(self, text: str) -> tuple[str, str]:
        state = self._state
        if state == _CONTENT:  # hot path once the think block is over
            return "", text
        buf = self._buf + text if self._buf else text
        reasoning = ""
        if state == _AUTO:
            stripped = buf.lstrip()
            if not stripped or (len(stripped) < len(THINK_START) and THINK_START.startswith(stripped)):
                self._buf = buf
                return "", ""
            if stripped.startswith(THINK_START):
                state = _REASONING
                buf = stripped[len(THINK_START) :]
            else:
                state = _CONTENT_START
                buf = stripped
        if state == _REASONING:
            end = buf.find(THINK_END)
            if end < 0:
                keep = held_suffix_len(buf, (THINK_END,))
                body = buf[: len(buf) - keep].rstrip()
                reasoning = self._reasoning_text(body)
                self._buf = buf[len(body) :]
                self._state = _REASONING
                return reasoning, ""
            reasoning = self._reasoning_text(buf[:end].rstrip())
            buf = buf[end + len(THINK_END) :]
            state = _CONTENT_START
        # _CONTENT_START: drop leading whitespace of the answer.
        content = buf.lstrip()
        self._buf = ""
        self._state = _CONTENT if content else _CONTENT_START
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Flush held text at the end of the output."""
        buf, self._buf = self._buf, ""
        if self._state == _AUTO:
            self._state = _CONTENT
            return "", buf.lstrip()
        if self._state == _REASONING:
            return self._reasoning_text(buf.rstrip()), ""
        return "", ""

    def _reasoning_text(self, body: str) -> str:
        if not self._reasoning_started:
            body = body.lstrip()
            self._reasoning_started = bool(body)
        return body


def split_reasoning(text: str, start: StartState = "auto") -> tuple[str, str]:
    """Non-streaming split of a whole output into ``(reasoning_content, content)``."""
    parser = Glm45ReasoningParser(start)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return r1 + r2, c1 + c2


REASONING_PARSERS: dict[str, type[Glm45ReasoningParser]] = {"glm45": Glm45ReasoningParser}


def get_reasoning_parser(name: str) -> type[Glm45ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ConfigError(f"unknown reasoning parser {name!r}; known: {sorted(REASONING_PARSERS)}") from None
