"""Server-sent events framing: ``data: {json}\\n\\n`` … ``data: [DONE]\\n\\n`` (OpenAI and SGLang).

:class:`SSEDecoder` is the incremental reader for the other direction (a router reading a
worker's stream): it accepts arbitrary byte chunking, ``\\n`` or ``\\r\\n`` line ends, multi-line
``data:`` fields, and comment/keep-alive lines.
"""

from __future__ import annotations

from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"
DONE_PAYLOAD = b"[DONE]"


def sse_event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class SSEDecoder:
    """Feed raw bytes, get the ``data`` payload of each complete event (``b"[DONE]"`` included)."""

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[bytes] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # blank line: dispatch
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)
        self._buf = buf[start:]
        return events

    def finish(self) -> list[bytes]:
        """End of stream: an event not terminated by a blank line still counts."""
        events = self.feed(b"\n") if self._buf else []
        if self._data:
            events.append(b"\n".join(self._data))
            self._data = []
        return events
