"""SharedKVPool: create, attach by name with checks, unlink, sweep of dead owners' segments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pdserve.kvtransfer.errors import HandshakeError, TransferLayoutMismatchError
from pdserve.kvtransfer.shm_pool import SEGMENT_PREFIX, SharedKVPool, list_segments, sweep_stale
from pdserve.kvtransfer.testing import tiny_layout

pytestmark = pytest.mark.unit


def test_create_attach_share_bytes_and_unlink(tmp_path: Path) -> None:
    layout = tiny_layout()
    with SharedKVPool.create(layout, 8, shm_dir=str(tmp_path)) as owner:
        assert owner.storage is not None and tuple(owner.storage.shape) == layout.storage_shape(8)
        assert list_segments(str(tmp_path)) == [owner.name]
        peer = SharedKVPool.attach(
            owner.name, layout=layout, num_blocks=8, incarnation=owner.incarnation, shm_dir=str(tmp_path)
        )
        assert peer.storage is not None
        peer.storage[1, 0, 3].fill_(7.0)
        assert float(owner.storage[1, 0, 3].float().mean()) == 7.0
        peer.close()
        assert list_segments(str(tmp_path)) == [owner.name]  # an attacher never unlinks
    assert list_segments(str(tmp_path)) == []


def test_attach_refuses_the_wrong_segment(tmp_path: Path) -> None:
    layout = tiny_layout()
    with SharedKVPool.create(layout, 8, shm_dir=str(tmp_path)) as owner:
        d = str(tmp_path)
        with pytest.raises(HandshakeError) as info:
            SharedKVPool.attach(owner.name, layout=layout, num_blocks=8, incarnation="0" * 32, shm_dir=d)
        assert info.value.reason == "peer_restarted"
        with pytest.raises(HandshakeError):
            SharedKVPool.attach(
                owner.name, layout=layout, num_blocks=9, incarnation=owner.incarnation, shm_dir=d
            )
        with pytest.raises(TransferLayoutMismatchError):
            SharedKVPool.attach(
                owner.name,
                layout=tiny_layout(head_dim=32),
                num_blocks=4,
                incarnation=owner.incarnation,
                shm_dir=d,
            )
        with pytest.raises(HandshakeError):
            SharedKVPool.attach("../etc/passwd", layout=layout, num_blocks=8, incarnation="0" * 32, shm_dir=d)
        with pytest.raises(HandshakeError):
            SharedKVPool.attach(
                SEGMENT_PREFIX + "1-missing", layout=layout, num_blocks=8, incarnation="0" * 32, shm_dir=d
            )


def test_sweep_removes_only_dead_owners(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above pid_max defaults: never a live process
    dead = tmp_path / f"{SEGMENT_PREFIX}{dead_pid}-deadbeef"
    alive = tmp_path / f"{SEGMENT_PREFIX}{os.getpid()}-cafe"
    other = tmp_path / "unrelated"
    for p in (dead, alive, other):
        p.write_bytes(b"x")
    assert sweep_stale(tmp_path) == [dead.name]
    assert alive.exists() and other.exists() and not dead.exists()


def test_an_owner_dropped_without_close_is_unlinked(tmp_path: Path) -> None:
    pool = SharedKVPool.create(tiny_layout(), 4, shm_dir=str(tmp_path))
    assert list_segments(str(tmp_path)) == [pool.name]
    del pool
    import gc

    gc.collect()
    assert list_segments(str(tmp_path)) == []
