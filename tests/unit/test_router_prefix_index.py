"""Router prefix index: chained block hashes, longest-prefix match, LRU bound that evicts leaves first."""

from __future__ import annotations

import pytest

from pdserve.errors import InvalidRequestError
from pdserve.router.prefix_index import PrefixIndex, chain_hashes, key_from_ids, key_from_text

pytestmark = pytest.mark.unit


def test_chain_hashes_cover_full_blocks_only() -> None:
    assert chain_hashes(list(range(15)), 16) == ()
    assert len(chain_hashes(list(range(16)), 16)) == 1
    assert len(chain_hashes(list(range(47)), 16)) == 2


def test_chained_hash_names_the_whole_prefix() -> None:
    a = chain_hashes([1] * 16 + [2] * 16, 16)
    b = chain_hashes([3] * 16 + [2] * 16, 16)
    assert a[1] != b[1], "same second block after a different first block must differ"
    assert chain_hashes([1] * 16 + [2] * 16 + [9] * 5, 16) == a


def test_bad_block_size() -> None:
    with pytest.raises(InvalidRequestError):
        chain_hashes([1, 2], 0)
    with pytest.raises(InvalidRequestError):
        PrefixIndex(0)


def test_match_counts_leading_blocks() -> None:
    idx = PrefixIndex(100)
    base = list(range(64))
    idx.insert(chain_hashes(base, 16))
    assert idx.match(chain_hashes(base, 16)) == 4
    assert idx.match(chain_hashes(base[:32] + [999] * 32, 16)) == 2
    assert idx.match(chain_hashes([7, *base[1:]], 16)) == 0
    assert len(idx) == 4


def test_lru_evicts_leaves_before_parents_and_stays_prefix_closed() -> None:
    idx = PrefixIndex(6)
    shared = list(range(32))  # 2 shared blocks
    a = chain_hashes(shared + [100] * 32, 16)  # 4 blocks
    b = chain_hashes(shared + [200] * 32, 16)  # 2 shared + 2 own
    idx.insert(a)
    idx.insert(b)
    assert len(idx) == 6
    c = chain_hashes([300] * 32, 16)
    idx.insert(c)  # two evictions: A's deepest blocks (oldest leaves)
    assert len(idx) == 6
    assert idx.match(a) == 2, "A keeps its shared prefix"
    assert idx.match(b) == 4
    assert idx.match(c) == 2
    for h in (a, b, c):  # prefix-closed: every held block's parent is held
        n = idx.match(h)
        assert all(x not in idx._blocks for x in h[n:])


def test_insert_longer_than_capacity_keeps_the_prefix() -> None:
    idx = PrefixIndex(3)
    h = chain_hashes(list(range(16 * 10)), 16)
    idx.insert(h)
    assert idx.match(h) == 3


def test_prompt_keys() -> None:
    k = key_from_ids(list(range(40)), 16)
    assert k.num_tokens == 40 and len(k.hashes) == 2 and k.exact
    assert k.matched_tokens(2) == 32 and k.matched_tokens(5) == 40
    t = key_from_text("x" * 200, 16)
    assert not t.exact and t.num_tokens == 50 and len(t.hashes) == 3
    assert set(t.hashes).isdisjoint(chain_hashes([ord("x")] * 200, 16))
