"""Page planning and views: block-id validation, joint runs, groups, checksums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.engine.kv_layout import allocate_kv_storage
from pdserve.errors import ConfigError
from pdserve.kvtransfer.errors import RoomError
from pdserve.kvtransfer.pages import (
    PageStore,
    as_block_array,
    is_consecutive,
    joint_runs,
    plan_groups,
    runs_of,
)
from pdserve.kvtransfer.testing import fill_random, tiny_layout

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bad", [[], [1, 1], [-1], [10], [[1, 2]], ["a"]])
def test_block_ids_validated(bad: object) -> None:
    with pytest.raises(RoomError):
        as_block_array(bad, 10, side="decode", room=3, what="destination")  # type: ignore[arg-type]


def test_runs() -> None:
    ids = np.array([4, 5, 6, 9, 2, 3])
    assert runs_of(ids) == [(0, 3), (3, 1), (4, 2)]
    src = np.array([0, 1, 2, 3, 4])
    dst = np.array([7, 8, 20, 21, 22])
    assert joint_runs(src, dst) == [(0, 2), (2, 3)]
    assert is_consecutive(np.array([3, 4, 5])) and not is_consecutive(np.array([3, 5]))


@pytest.mark.parametrize("seed", range(5))
def test_groups_cover_exactly_and_respect_the_cap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    src = rng.permutation(400)[:n] if seed % 2 else np.arange(n) + 5
    dst = rng.permutation(400)[:n]
    lo, hi = int(rng.integers(0, n)), n
    groups = plan_groups(src, dst, lo, hi, 8)
    covered = [p for start, length in groups for p in range(start, start + length)]
    assert covered == list(range(lo, hi))
    assert all(1 <= length <= 8 for _, length in groups)


def test_long_joint_runs_stay_whole() -> None:
    src = np.arange(40)
    dst = np.concatenate([np.arange(100, 120), np.array([5, 9, 3]), np.arange(200, 217)])
    groups = plan_groups(src, dst, 0, 40, 16)
    assert groups[0] == (0, 16) and groups[1] == (16, 4)  # first joint run, split at the cap
    assert (20, 3) in groups  # the scattered positions batched together


def test_page_store_checks_storage() -> None:
    layout = tiny_layout()
    with pytest.raises(ConfigError):
        PageStore(layout, torch.zeros(3, 2, 4, 4, 2, 16, dtype=torch.bfloat16))
    with pytest.raises(ConfigError):
        PageStore(layout, torch.zeros(layout.storage_shape(4), dtype=torch.float32))
    with pytest.raises(ConfigError):
        PageStore(layout, torch.zeros(layout.storage_shape(4), dtype=torch.bfloat16).transpose(0, 1))


def test_checksums_match_after_a_page_copy_and_catch_one_bit() -> None:
    layout = tiny_layout()
    a, b = allocate_kv_storage(layout, 16), allocate_kv_storage(layout, 16)
    fill_random(a, 1)
    src, dst = np.array([3, 4, 9, 0]), np.array([10, 2, 11, 5])
    for s, d in zip(src, dst, strict=True):
        b[:, :, d] = a[:, :, s]
    sa, sb = PageStore(layout, a), PageStore(layout, b)
    assert sa.layer_checksums(src) == sb.layer_checksums(dst)
    raw = sb.run_bytes(2, 1, 11, 1)
    raw[5] ^= 0x01
    diff = [
        i
        for i, (x, y) in enumerate(zip(sa.layer_checksums(src), sb.layer_checksums(dst), strict=True))
        if x != y
    ]
    assert diff == [2]
    assert sa.run(1, 0, 3, 2).shape == (2, layout.page_numel)
