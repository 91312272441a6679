"""Transport backends driven directly (no sockets): shm copies, the nccl control logic on a
CPU loopback, and clear errors when a transport cannot run here."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pdserve.engine.kv_layout import allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import TransferError, TransportUnavailableError
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.protocol import Done, NcclPlan
from pdserve.kvtransfer.testing import fill_random, same_pages, tiny_layout
from pdserve.kvtransfer.transports.base import DecodePeer, SendJob
from pdserve.kvtransfer.transports.nccl import NcclRecvBackend, NcclSendBackend
from pdserve.kvtransfer.transports.nccl_lib import LoopbackP2P, NcclLibrary
from pdserve.kvtransfer.transports.shm import ShmRecvBackend, ShmSendBackend

pytestmark = pytest.mark.unit

INC = "cd" * 16


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def data_started(self, room: int) -> None:
        self.events.append(("started", room))

    def data_done(self, room: int, done: Done) -> None:
        self.events.append(("done", room))

    def data_failed(self, room: int, error: TransferError) -> None:
        self.events.append(("failed", error))

    def garbage(self, what: str) -> None:
        self.events.append(("garbage", what))


def _job(
    room: int,
    src: np.ndarray,
    dst: np.ndarray,
    layers: tuple[int, int],
    cancel: threading.Event | None = None,
) -> SendJob:
    return SendJob(
        room=room,
        decode_inc=INC,
        src=src,
        dst=dst,
        layer_lo=layers[0],
        layer_hi=layers[1],
        pos_lo=0,
        pos_hi=src.size,
        cancel=cancel or threading.Event(),
        deadline=time.monotonic() + 10,
    )


def test_shm_backends_copy_scattered_pages_straight_into_the_segment(tmp_path: Path) -> None:
    layout = tiny_layout()
    cfg = TransferConfig(transport="shm", shm_dir=str(tmp_path))
    src = allocate_kv_storage(layout, 32)
    fill_random(src, 3)
    recv = ShmRecvBackend(cfg, layout, 40, INC, Sink())
    send = ShmSendBackend(cfg, PageStore(layout, src), lambda *a: None)
    peer = DecodePeer(INC, "d", recv.endpoint(), INC.encode())
    send.connect(peer)
    s_ids = np.array([5, 6, 7, 30, 2, 11, 12])
    d_ids = np.array([0, 1, 2, 3, 39, 20, 17])
    moved = send.send_pages(_job(1, s_ids, d_ids, (0, 2)))
    moved += send.send_pages(_job(1, s_ids, d_ids, (2, 4)))
    assert moved == s_ids.size * layout.block_nbytes
    assert same_pages(src, s_ids.tolist(), recv.storage, d_ids.tolist())
    cancelled = threading.Event()
    cancelled.set()
    assert send.send_pages(_job(2, s_ids, d_ids, (0, 4), cancelled)) == 0
    send.close()
    assert send.describe()["mapped_segments"] == 0
    recv.close()
    assert not list(tmp_path.iterdir())


def test_shm_refuses_a_segment_of_another_incarnation(tmp_path: Path) -> None:
    layout = tiny_layout()
    cfg = TransferConfig(transport="shm", shm_dir=str(tmp_path))
    recv = ShmRecvBackend(cfg, layout, 8, INC, Sink())
    send = ShmSendBackend(cfg, PageStore(layout, allocate_kv_storage(layout, 8)), lambda *a: None)
    with pytest.raises(TransferError) as info:
        send.connect(DecodePeer("ef" * 16, "d", recv.endpoint(), b"x"))
    assert info.value.reason == "peer_restarted"
    recv.close()


def test_nccl_control_logic_on_the_cpu_loopback() -> None:
    layout = tiny_layout()
    cfg = TransferConfig(transport="nccl", frame_pages=2)
    lib = LoopbackP2P()
    src = allocate_kv_storage(layout, 32)
    fill_random(src, 4)
    sink = Sink()
    recv = NcclRecvBackend(cfg, layout, 40, sink, lib=lib)
    recv.start()
    plans: list[NcclPlan] = []

    def post(decode_inc: str, room: int, layers: tuple[int, int], groups: list[tuple[int, int]]) -> None:
        plan = NcclPlan(room=room, prefill_inc=INC, layers=layers, groups=groups)
        plans.append(plan)
        recv.on_plan("p:1", plan)  # what the control channel does, in order

    send = NcclSendBackend(cfg, PageStore(layout, src), post, lib=lib)
    peer = DecodePeer(INC, "d", recv.endpoint(), b"x")
    uid = send.ack_endpoint(peer)
    assert send.ack_endpoint(peer) == uid  # one communicator per decode incarnation
    recv.on_ack("p:1", INC, uid)
    s_ids, d_ids = np.array([1, 2, 3, 9, 4]), np.array([30, 31, 5, 7, 6])
    recv.expect(1, INC, d_ids, "p:1")
    send.connect(peer)
    send.send_pages(_job(1, s_ids, d_ids, (0, 4)))
    assert recv.finish(1, 10.0)
    assert same_pages(src, s_ids.tolist(), recv.storage, d_ids.tolist())
    assert ("started", 1) in sink.events and plans and plans[0].layers == (0, 4)
    # a forgotten room's announced pages still pair up, but land in scratch, not in its pages
    before = recv.storage.clone()
    recv.expect(2, INC, d_ids, "p:1")
    recv.forget(2)
    send.send_pages(_job(2, s_ids, d_ids, (0, 4)))
    assert recv.finish(2, 10.0)
    assert torch.equal(before.view(torch.uint8), recv.storage.view(torch.uint8))
    send.close()
    recv.close()


def test_nccl_is_unavailable_here_with_a_clear_error() -> None:
    layout = tiny_layout()
    cfg = TransferConfig(transport="nccl", device="cuda:0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU-marked integration test covers nccl")
    with pytest.raises(TransportUnavailableError, match="CUDA"):
        NcclRecvBackend(cfg, layout, 8, Sink())
    with pytest.raises(TransportUnavailableError, match="CUDA"):
        NcclSendBackend(cfg, PageStore(layout, allocate_kv_storage(layout, 8)), lambda *a: None)
    with pytest.raises(TransportUnavailableError, match="nvidia-nccl-cu12"):
        NcclLibrary("/nonexistent/libnccl.so.2")
