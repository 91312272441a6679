"""Per-worker prefix index: which prompt prefixes a worker has recently computed.

The router's view of each worker's KV prefix cache, used for cache-aware prefill routing and for
conditional disaggregation. Prompts are cut into fixed-size blocks and each full block is named by
a chained hash (hash of the previous block's name and this block's tokens), exactly the way a
paged KV cache names its reusable blocks: a block name identifies the whole prefix up to it, so
the set of names a worker holds is a radix tree over block-aligned prefixes, stored flat.

LRU bound: each index keeps at most ``max_blocks`` names. Inserting touches a prompt's blocks
deepest-first, so a parent is always at least as recent as its children and eviction removes
leaves before their parents -- the stored set stays prefix-closed and a match is simply the count
of leading names present.

Keys are token ids. When a request carries only text and no tokenizer is loaded, its UTF-8 bytes
are used instead (blocks of ``4 * block_size`` bytes, roughly the same span of text), salted so
byte keys never collide with token keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.errors import InvalidRequestError

_BYTES_SALT = 0x5BD1E995  # separates byte-keyed chains from token-keyed ones
BYTES_PER_TOKEN = 4  # rough text-to-token ratio for byte keys


@dataclass(frozen=True, slots=True)
class PromptKey:
    """A prompt as the router sees it: chained block hashes and its length in tokens.

    ``num_tokens`` is exact for token-id prompts and an estimate (bytes / 4) for byte keys."""

    hashes: tuple[int, ...]
    num_tokens: int
    block_tokens: int  # tokens per block (exact or estimated), to turn block matches into tokens
    exact: bool = True

    def matched_tokens(self, blocks: int) -> int:
        return min(self.num_tokens, blocks * self.block_tokens)


def chain_hashes(ids: Sequence[int], block_size: int, salt: int = 0) -> tuple[int, ...]:
    """Chained hashes of every full block of ``ids``."""
    if block_size < 1:
        raise InvalidRequestError(f"block_size must be >= 1, got {block_size}")
    out: list[int] = []
    prev = salt
    n_full = len(ids) - len(ids) % block_size
    for start in range(0, n_full, block_size):
        prev = hash((prev, tuple(ids[start : start + block_size])))
        out.append(prev)
    return tuple(out)


def key_from_ids(ids: Sequence[int], block_size: int) -> PromptKey:
    return PromptKey(chain_hashes(ids, block_size), len(ids), block_size, True)


def key_from_text(text: str, block_size: int) -> PromptKey:
    """Approximate key for a text prompt when no tokenizer is available (UTF-8 byte blocks)."""
    data = text.encode("utf-8")
    span = block_size * BYTES_PER_TOKEN
    prev = _BYTES_SALT
    hashes: list[int] = []
    for start in range(0, len(data) - len(data) % span, span):
        prev = hash((prev, data[start : start + span]))
        hashes.append(prev)
    return PromptKey(tuple(hashes), max(1, len(data) // BYTES_PER_TOKEN), block_size, False)


class PrefixIndex:
    """One worker's LRU-bounded set of block names (see the module docstring)."""

    __slots__ = ("_blocks", "hits", "lookups", "max_blocks")

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise InvalidRequestError(f"max_blocks must be >= 1, got {max_blocks}")
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.lookups = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` this worker holds (no LRU update)."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Record that the worker now holds every block of ``hashes``; evict LRU leaves."""
        if not hashes:
            return
        blocks = self._blocks
        if len(hashes) > self.max_blocks:
            hashes = hashes[: self.max_blocks]
        for h in reversed(hashes):  # deepest first: parents end up most recent
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        overflow = len(blocks) - self.max_blocks
        for _ in range(overflow):
            blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
