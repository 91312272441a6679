"""Paged KV block allocator with a prefix cache.

Bookkeeping only (no tensors): the pool has ``num_blocks`` fixed-size blocks of ``block_size``
token slots. Every block is in exactly one of three states:

* **free** — no reusable content, on the free list;
* **cached** — unreferenced but holding the K/V of a full block whose chained content hash is
  registered; reusable by a later prefix hit until evicted (LRU order, least recently freed first);
* **used** — referenced by ``ref_count`` block tables (shared prefix blocks have ``ref_count > 1``).

Lifecycle of a sequence's blocks:

1. ``can_allocate(seq)`` / ``allocate(seq)``: match the longest registered prefix of full blocks
   (never the block holding the last token, which must be computed to get logits), take those
   blocks (ref + 1), and take fresh blocks for the rest (free list first, then evict the LRU
   cached block). ``seq.num_computed_tokens`` becomes the number of cached tokens.
2. ``can_append(seq)`` / ``append_slot(seq)``: before a step, make the table cover every token.
3. ``register_computed(seq)``: after a step, offer each newly *computed* full block to the prefix
   cache (a block is registered only once its K/V exist, so a hit never reads unwritten pages).
4. ``free(seq)``: ref - 1 on each block (tail first); blocks reaching 0 become cached if
   registered, else free.

Owners that are not running sequences (a PD decode-side reservation) use ``reserve(owner, n)`` and
``free_owner(owner)``. Every live table is known by owner id, so :meth:`check_invariants` can
verify that refcounts equal the number of tables holding each block.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from pdserve.engine.sequence import ROOT_HASH, Sequence, block_hash
from pdserve.errors import OverloadedError, PdserveError

logger = logging.getLogger(__name__)


class BlockManagerError(PdserveError):
    """Misuse of the allocator (double allocation, unknown owner) or a broken invariant."""


class OutOfBlocksError(OverloadedError):
    """Not enough free or evictable blocks for the request now."""


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # registered content hash (None: free or not registrable)
    parent_hash: int = ROOT_HASH
    tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise BlockManagerError(
                f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0, registered; first = LRU
        self._hash_to_block: dict[int, int] = {}
        self._tables: dict[str, list[int]] = {}
        self.num_evictions = 0

    # ------------------------------------------------------------------ counters
    @property
    def num_free(self) -> int:
        """Blocks with no reusable content."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for prefix hits (evictable)."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take now (free + evictable cached)."""
        return len(self._free) + len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, owner: str) -> list[int]:
        try:
            return self._tables[owner]
        except KeyError:
            raise BlockManagerError(f"no blocks are held by {owner!r}") from None

    def holds(self, owner: str) -> bool:
        return owner in self._tables

    # ---------------------------------------------------------------- allocation
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks holding seq's leading full blocks (all but its last token)."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        n_full = (seq.num_tokens - 1) // bs
        if n_full == 0:
            return []
        hashes = seq.full_block_hashes(bs, n_full)
        hits: list[int] = []
        parent = ROOT_HASH
        for i in range(n_full):
            bid = self._hash_to_block.get(hashes[i])
            if bid is None:
                break
            blk = self._blocks[bid]
            if blk.parent_hash != parent or blk.tokens != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break  # hash collision: treat as a miss
            hits.append(bid)
            parent = hashes[i]
        return hits

    def _fits(self, seq: Sequence, hits: list[int]) -> bool:
        needed = self.blocks_for(seq.num_tokens) - len(hits)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return needed <= self.num_available - revived

    def can_allocate(self, seq: Sequence) -> bool:
        return self._fits(seq, self.match_prefix(seq))

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` a block table for all its tokens, reusing cached prefix blocks."""
        if seq.request_id in self._tables:
            raise BlockManagerError(f"{seq.request_id!r} already holds blocks")
        hits = self.match_prefix(seq)
        if not self._fits(seq, hits):
            raise OutOfBlocksError(
                f"not enough KV blocks for {seq.num_tokens} tokens ({self.num_available} available)"
            )
        self._take_table(seq, hits)

    def _take_table(self, seq: Sequence, hits: list[int]) -> None:
        for bid in hits:
            self._ref(bid)
        table = hits + [self._take_fresh() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        self._tables[seq.request_id] = table
        seq.block_table = table
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size

    def try_allocate(self, seq: Sequence) -> bool:
        """:meth:`allocate` if it fits now; False (nothing taken) otherwise."""
        if seq.request_id in self._tables:
            raise BlockManagerError(f"{seq.request_id!r} already holds blocks")
        hits = self.match_prefix(seq)
        if not self._fits(seq, hits):
            return False
        self._take_table(seq, hits)
        return True

    def can_append(self, seq: Sequence) -> bool:
        missing = self.blocks_for(seq.num_tokens) - len(seq.block_table)
        return missing <= 0 or missing <= self.num_available

    def append_slot(self, seq: Sequence) -> None:
        """Extend seq's table so it covers all of its tokens (at most one block per decode step)."""
        table = self._owned_table(seq)
        missing = self.blocks_for(seq.num_tokens) - len(table)
        if missing > self.num_available:
            raise OutOfBlocksError(f"no free KV block for {seq.request_id!r}")
        for _ in range(missing):
            table.append(self._take_fresh())

    def register_computed(self, seq: Sequence) -> None:
        """Offer seq's newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if n_full <= seq.num_registered_blocks:
            return
        hashes = seq.full_block_hashes(bs, n_full)
        for i in range(seq.num_registered_blocks, n_full):
            blk = self._blocks[seq.block_table[i]]
            h = hashes[i]
            if blk.hash is None and h not in self._hash_to_block:
                blk.hash = h
                blk.parent_hash = hashes[i - 1] if i else ROOT_HASH
                blk.tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self._hash_to_block[h] = blk.block_id
        seq.num_registered_blocks = n_full

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (no-op if it holds none); cached blocks stay reusable."""
        if seq.request_id in self._tables:
            if self._tables[seq.request_id] is not seq.block_table:
                raise BlockManagerError(f"{seq.request_id!r}: block table does not match the allocator's")
            self.free_owner(seq.request_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ------------------------------------------------------------ owner-level API
    def reserve(self, owner: str, num_blocks: int) -> list[int]:
        """``num_blocks`` fresh blocks held by ``owner`` (no prefix matching)."""
        if owner in self._tables:
            raise BlockManagerError(f"{owner!r} already holds blocks")
        if num_blocks <= 0:
            raise BlockManagerError(f"cannot reserve {num_blocks} blocks")
        if num_blocks > self.num_available:
            raise OutOfBlocksError(f"not enough KV blocks: need {num_blocks}, {self.num_available} available")
        table = [self._take_fresh() for _ in range(num_blocks)]
        self._tables[owner] = table
        return table

    def free_owner(self, owner: str) -> bool:
        """Release every block ``owner`` holds; False if it holds none."""
        table = self._tables.pop(owner, None)
        if table is None:
            return False
        for bid in reversed(table):
            blk = self._blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                if blk.hash is not None:
                    self._cached[bid] = None
                else:
                    self._free.append(bid)
        table.clear()
        return True

    def register_blocks(self, token_ids: list[int], table: list[int]) -> int:
        """Register the full blocks of ``token_ids`` held in ``table`` (K/V already present, e.g.
        received from a prefill peer). Returns the number of blocks registered."""
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent = ROOT_HASH
        count = 0
        for i in range(min(len(token_ids) // bs, len(table))):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            blk = self._blocks[table[i]]
            if blk.hash is None and h not in self._hash_to_block:
                blk.hash, blk.parent_hash, blk.tokens = h, parent, tokens
                self._hash_to_block[h] = blk.block_id
                count += 1
            parent = h
        return count

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached block (they become free). Returns how many."""
        n = 0
        while self._cached:
            bid, _ = self._cached.popitem(last=False)
            self._forget(self._blocks[bid])
            self._free.append(bid)
            n += 1
        return n

    # ------------------------------------------------------------------ internals
    def _owned_table(self, seq: Sequence) -> list[int]:
        table = self._tables.get(seq.request_id)
        if table is None or table is not seq.block_table:
            raise BlockManagerError(f"{seq.request_id!r} holds no blocks from this allocator")
        return table

    def _ref(self, bid: int) -> None:
        blk = self._blocks[bid]
        if blk.ref_count == 0:
            self._cached.pop(bid, None)
        blk.ref_count += 1

    def _take_fresh(self) -> int:
        if self._free:
            bid = self._free.popleft()
        elif self._cached:
            bid, _ = self._cached.popitem(last=False)
            self._forget(self._blocks[bid])
            self.num_evictions += 1
        else:
            raise OutOfBlocksError("KV block pool exhausted")
        self._blocks[bid].ref_count = 1
        return bid

    def _forget(self, blk: _Block) -> None:
        if blk.hash is not None and self._hash_to_block.get(blk.hash) == blk.block_id:
            del self._hash_to_block[blk.hash]
        blk.hash, blk.parent_hash, blk.tokens = None, ROOT_HASH, ()

    def check_invariants(self) -> None:
        """Raise :class:`BlockManagerError` unless every block is free, cached or referenced by
        exactly ``ref_count`` tables, and the free list / LRU / hash map agree with the blocks."""
        counts: Counter[int] = Counter()
        for owner, table in self._tables.items():
            if len(set(table)) != len(table):
                raise BlockManagerError(f"table of {owner!r} holds a block twice: {table}")
            counts.update(table)
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockManagerError("free list holds a block twice")
        for blk in self._blocks:
            bid, ref = blk.block_id, blk.ref_count
            if ref != counts.get(bid, 0):
                raise BlockManagerError(f"block {bid}: ref_count {ref} != {counts.get(bid, 0)} tables")
            states = (bid in free) + (bid in self._cached) + (ref > 0)
            if states != 1:
                raise BlockManagerError(f"block {bid} is in {states} states (ref {ref})")
            if bid in free and blk.hash is not None:
                raise BlockManagerError(f"free block {bid} still carries a hash")
            if bid in self._cached and blk.hash is None:
                raise BlockManagerError(f"cached block {bid} has no hash")
            if blk.hash is not None and self._hash_to_block.get(blk.hash) != bid:
                raise BlockManagerError(f"block {bid}'s hash is not mapped to it")
        for h, bid in self._hash_to_block.items():
            if self._blocks[bid].hash != h:
                raise BlockManagerError(f"hash map entry for block {bid} is stale")
