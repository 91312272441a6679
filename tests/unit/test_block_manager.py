"""Block manager: allocation, prefix cache, LRU eviction, invariants under random operation mixes."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.block_manager import BlockManager, BlockManagerError, OutOfBlocksError
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.errors import OverloadedError

pytestmark = pytest.mark.unit

BS = 4


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(), 100, 0)


def compute_all(bm: BlockManager, s: Sequence) -> None:
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)


def test_allocate_free_counters() -> None:
    bm = BlockManager(10, BS)
    a = seq("a", list(range(10)))  # 3 blocks
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_computed_tokens == 0
    assert (bm.num_free, bm.num_cached, bm.num_used) == (7, 0, 3)
    bm.check_invariants()
    bm.free(a)
    assert (bm.num_free, bm.num_cached, bm.num_used) == (10, 0, 0)
    assert a.block_table == []
    bm.check_invariants()


def test_prefix_hit_shares_blocks_and_refcounts() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", list(range(11)))
    bm.allocate(a)
    compute_all(bm, a)  # registers the 2 full blocks
    b = seq("b", [*range(8), 50, 51, 52, 53, 54])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert b.num_computed_tokens == 8
    bm.check_invariants()
    bm.free(a)
    bm.check_invariants()
    assert bm.num_used == len(b.block_table)  # the shared blocks are still referenced by b
    bm.free(b)
    assert bm.num_used == 0 and bm.num_cached == 2
    bm.check_invariants()


def test_block_holding_last_token_is_recomputed() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", list(range(8)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    b = seq("b", list(range(8)))  # same prompt, exactly 2 full blocks
    bm.allocate(b)
    assert b.num_computed_tokens == 4  # the last block must be computed again to get logits
    c = seq("c", list(range(9)))
    bm.allocate(c)
    assert c.num_computed_tokens == 8


def test_uncomputed_blocks_are_not_hits() -> None:
    bm = BlockManager(16, BS)
    a = seq("a", list(range(12)))
    bm.allocate(a)
    a.num_computed_tokens = 4  # first chunk only
    bm.register_computed(a)
    b = seq("b", list(range(13)))
    bm.allocate(b)
    assert b.num_computed_tokens == 4


def test_freed_cached_block_reused_until_evicted_lru() -> None:
    bm = BlockManager(4, BS)
    a = seq("a", list(range(9)))  # 3 blocks, 2 full
    bm.allocate(a)
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert (bm.num_free, bm.num_cached) == (2, 2)
    assert bm.match_prefix(seq("x", list(range(9)))) == a_blocks[:2]  # still reusable after free
    # an unrelated sequence needing 3 blocks takes the 2 free blocks, then evicts one cached block
    c = seq("c", [90 + i for i in range(9)])
    bm.allocate(c)
    assert bm.num_evictions == 1 and bm.num_cached == 1
    bm.check_invariants()
    # blocks are freed tail first, so the LRU victim is a's second block; its first survives
    d = seq("d", list(range(5)))
    assert bm.match_prefix(d) == a_blocks[:1]
    assert bm.match_prefix(seq("e", list(range(9)))) == a_blocks[:1]
    bm.free(c)
    bm.allocate(d)
    assert d.block_table[0] == a_blocks[0] and d.num_computed_tokens == 4
    bm.check_invariants()


def test_hash_collision_is_a_miss() -> None:
    bm = BlockManager(8, BS)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)
    compute_all(bm, a)
    b = seq("b", [9, 9, 9, 9, 5])
    b.block_hashes = list(a.block_hashes)  # forge a colliding hash chain
    assert bm.match_prefix(b) == []


def test_errors() -> None:
    bm = BlockManager(4, BS)
    a = seq("a", list(range(5)))
    bm.allocate(a)
    with pytest.raises(BlockManagerError):
        bm.allocate(a)
    with pytest.raises(BlockManagerError):
        bm.append_slot(seq("zz", [1]))
    big = seq("big", list(range(40)))
    assert not bm.can_allocate(big)
    with pytest.raises(OutOfBlocksError) as info:
        bm.allocate(big)
    assert isinstance(info.value, OverloadedError)
    with pytest.raises(OutOfBlocksError):
        bm.reserve("r", 3)
    with pytest.raises(BlockManagerError):
        bm.table("nobody")
    with pytest.raises(BlockManagerError):
        BlockManager(0, BS)
    assert not bm.try_allocate(big)
    bm.check_invariants()


def test_append_slot_grows_one_block_at_a_time() -> None:
    bm = BlockManager(3, BS)
    s = seq("s", [1, 2, 3, 4])
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.token_ids.append(5)
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2
    s.token_ids += [6, 7, 8, 9]
    bm.append_slot(s)
    assert len(s.block_table) == 3
    s.token_ids += [10, 11, 12, 13]
    assert not bm.can_append(s)
    with pytest.raises(OutOfBlocksError):
        bm.append_slot(s)
    bm.check_invariants()


def test_reserve_register_and_reset() -> None:
    bm = BlockManager(8, BS)
    table = bm.reserve("r", 3)
    assert len(table) == 3 and bm.holds("r")
    assert bm.register_blocks(list(range(10)), table) == 2
    bm.check_invariants()
    assert bm.free_owner("r") and not bm.free_owner("r")
    assert bm.num_cached == 2
    s = seq("s", list(range(10)))
    assert len(bm.match_prefix(s)) == 2
    assert bm.reset_prefix_cache() == 2
    assert bm.match_prefix(s) == [] and bm.num_free == 8
    bm.check_invariants()


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq("a", list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_cached == 0 and bm.match_prefix(seq("b", list(range(9)))) == []


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_invariants_and_content(seed: int) -> None:
    """Random allocate / compute / decode / free / reserve mixes. A shadow "KV" array records the
    token each slot holds; every prefix hit must point at blocks holding exactly the hit tokens."""
    rng = random.Random(seed)
    num_blocks = rng.choice([6, 12, 24])
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=rng.random() < 0.85)
    slot_token: dict[tuple[int, int], int] = {}
    live: dict[str, Sequence] = {}
    owners: list[str] = []
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    for step in range(300):
        op = rng.random()
        if op < 0.35:
            tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
            s = seq(f"s{step}", tokens)
            if bm.can_allocate(s):
                free_before = bm.num_available
                bm.allocate(s)
                assert bm.num_available <= free_before
                for p in range(s.num_computed_tokens):  # the cached prefix must hold these tokens
                    assert slot_token[(s.block_table[p // BS], p % BS)] == s.token_ids[p]
                live[s.request_id] = s
            else:
                with pytest.raises(OutOfBlocksError):
                    bm.allocate(s)
        elif op < 0.6 and live:
            s = live[rng.choice(sorted(live))]
            upto = rng.randint(s.num_computed_tokens, s.num_tokens)
            for p in range(s.num_computed_tokens, upto):
                slot_token[(s.block_table[p // BS], p % BS)] = s.token_ids[p]
            s.num_computed_tokens = upto
            bm.register_computed(s)
        elif op < 0.75 and live:
            s = live[rng.choice(sorted(live))]
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(rng.randrange(5))
                if bm.can_append(s):
                    bm.append_slot(s)
                else:
                    s.token_ids.pop()
        elif op < 0.9 and live:
            s = live.pop(rng.choice(sorted(live)))
            bm.free(s)
        elif op < 0.95:
            n = rng.randint(1, 3)
            if n <= bm.num_available:
                owner = f"o{step}"
                bm.reserve(owner, n)
                owners.append(owner)
        elif owners:
            assert bm.free_owner(owners.pop(rng.randrange(len(owners))))
        bm.check_invariants()
        assert bm.num_free + bm.num_cached + bm.num_used == num_blocks
    for s in live.values():
        bm.free(s)
    for owner in owners:
        bm.free_owner(owner)
    bm.check_invariants()
    assert bm.num_used == 0
