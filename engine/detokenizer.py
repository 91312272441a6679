"""Streaming detokenisation: token ids in, text deltas out.

Lifecycle of an :class:`IncrementalDetokenizer`:

1. Create one per request (``prompt_ids`` give context: their trailing bytes of an unfinished
   UTF-8 character, or the leading-space context of SentencePiece-style decoders).
2. ``add(ids)`` after every step returns the text those ids completed. A character whose bytes
   are split over several tokens is held back until its last byte arrives, so a delta never
   carries U+FFFD for an incomplete sequence (genuinely invalid bytes still become U+FFFD).
3. ``finish()`` at the end flushes what is held (a dangling partial character becomes U+FFFD).
   ``"".join(deltas) + finish()`` equals ``tokenizer.decode(output_ids, skip_special_tokens)``
   (when the prompt does not end inside a character).

Two strategies, chosen from the tokenizer: byte-level BPE tokenizers (GLM, Qwen, Llama-3, GPT-2)
map every id to its raw bytes once and feed an incremental UTF-8 decoder — exact and O(1) per
token. Other decoders use the windowed re-decode of vLLM/SGLang (decode a small window of recent
tokens twice and emit the difference), holding at most ``max_hold_tokens`` tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.engine.tokenizer import Tokenizer

_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas (one instance per request)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        *,
        max_hold_tokens: int = 6,
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip: frozenset[int] = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._max_hold = max(1, max_hold_tokens)
        self._parts: list[str] = []
        self.num_tokens = 0
        self._finished = False
        tail = [i for i in (prompt_ids or ())[-_PROMPT_CONTEXT_TOKENS:] if i not in self._skip]
        self._table = tokenizer.byte_table()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # window strategy state: ids[prefix:read] were already emitted, ids[read:] are held
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        if self._table is not None:
            if tail:
                self._utf8.decode(self._bytes_of(tail), final=False)  # keep only a pending partial char
        else:
            self._ids = tail
            self._read = len(tail)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def byte_level(self) -> bool:
        return self._table is not None

    def _bytes_of(self, ids: Sequence[int]) -> bytes:
        table = self._table
        if table is None:
            raise RuntimeError("byte table unavailable")  # unreachable: callers check byte_level
        n = len(table)
        return b"".join(table[i] for i in ids if 0 <= i < n and i not in self._skip)

    def add(self, token_ids: Sequence[int] | int) -> str:
        """Append generated ids; return the newly completed text (possibly empty)."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add() after finish()")
        self.num_tokens += len(ids)
        if self._table is not None:
            delta = self._utf8.decode(self._bytes_of(ids), final=False)
        else:
            delta = self._add_windowed([i for i in ids if i not in self._skip], flush=False)
        if delta:
            self._parts.append(delta)
        return delta

    def finish(self) -> str:
        """Flush held bytes (an unfinished character becomes U+FFFD). Idempotent."""
        if self._finished:
            return ""
        self._finished = True
        if self._table is not None:
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._add_windowed([], flush=True)
        if delta:
            self._parts.append(delta)
        return delta

    def _add_windowed(self, ids: list[int], *, flush: bool) -> str:
        self._ids.extend(ids)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
        end = len(self._ids)
        new_text = decode(self._ids[self._prefix : end])
        if new_text.endswith(_REPLACEMENT) and not flush:
            # An unfinished multi-byte character at the end: emit up to the longest clean cut and
            # hold its trailing tokens; past max_hold tokens the bytes are invalid, not unfinished.
            clean: tuple[int, str] | None = None
            for cut in range(end - 1, self._read, -1):
                if end - cut > self._max_hold:
                    break
                text = decode(self._ids[self._prefix : cut])
                if not text.endswith(_REPLACEMENT):
                    clean = (cut, text)
                    break
            if clean is not None:
                end, new_text = clean
            elif end - self._read <= self._max_hold:
                return ""
        if len(new_text) <= len(prefix_text) and not flush:
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, end
        if self._prefix > 64:  # keep the window small: drop ids that no longer matter
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta
