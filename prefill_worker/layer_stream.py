"""Layer-wise KV streaming: the engine's per-layer hook feeds the rooms' senders.

The engine calls ``LLMEngine.layer_callback(layer, spans)`` on its own thread after layer
``layer``'s K/V of the current step are written; ``spans`` names, per sequence in the step, the
token range computed and the sequence's block table. :class:`LayerStreamer` is that callback:

1. the prefill leg ``attach``-es a request's :class:`KVSender` once the decode registered (before
   the request enters the engine) and ``detach``-es it when the prompt is computed or the leg
   ends, whichever comes first;
2. for a span of an attached request, layer 0 names the source pages (``set_source``, a
   prefix-preserving extension chunk after chunk); every layer then marks its pages final
   (``on_layer_done``): the full pages below ``end_pos`` — or all pages once the chunk reaches
   the end of the prompt — so the data thread ships layer ``l`` while layer ``l+1`` computes;
3. a sender that refuses (its room failed, or a preempted sequence came back on other pages) is
   detached; the leg sees the room's error when it calls ``finish``. Nothing raised here ever
   reaches the engine step (which would fail every request in the batch).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pdserve.engine.llm_engine import ChunkSpan
from pdserve.kvtransfer.sender import KVSender

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    sender: KVSender
    num_prompt_tokens: int
    pages_named: int = 0


class LayerStreamer:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.failures = 0

    def attach(self, request_id: str, sender: KVSender, num_prompt_tokens: int) -> None:
        with self._lock:
            self._entries[request_id] = _Entry(sender, num_prompt_tokens)

    def detach(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, layer: int, spans: list[ChunkSpan]) -> None:
        """The engine's ``layer_callback`` (engine thread)."""
        if not self._entries:
            return
        for span in spans:
            with self._lock:
                entry = self._entries.get(span.request_id)
            if entry is None:
                continue
            try:
                self._feed(entry, layer, span)
            except Exception as exc:  # the room failed: stop feeding it, the leg reports why
                self.failures += 1
                logger.info("request %s: layer streaming stopped: %s", span.request_id, exc)
                self.detach(span.request_id)

    def _feed(self, entry: _Entry, layer: int, span: ChunkSpan) -> None:
        bs = self.block_size
        end = min(span.end_pos, entry.num_prompt_tokens)
        pages = -(-end // bs)
        if layer == 0 and pages > entry.pages_named:
            entry.sender.set_source(span.block_ids[:pages])
            entry.pages_named = pages
        if end >= entry.num_prompt_tokens:
            entry.sender.on_layer_done(layer, None)  # the last chunk: every page is final
        elif end // bs:
            entry.sender.on_layer_done(layer, end // bs)
