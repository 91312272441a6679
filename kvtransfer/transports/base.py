"""The transport (backend) interface: one half per role, chosen by ``TransferConfig.transport``.

Prefill side — :class:`SendBackend`; every method except ``describe``/``ack_endpoint`` runs on
the prefill service's data thread (one thread, jobs in FIFO order):

1. ``connect(peer)`` when the first room of a decode incarnation is about to move (map its
   shm segment, connect a PUSH socket, set up an NCCL communicator, ...);
2. ``send_pages(job)`` copies/sends ``job.layers`` x ``job.positions`` of one room; it checks
   ``job.cancel`` between page groups and returns the bytes moved;
3. ``send_done(decode_inc, done)`` returns True if it delivered ``done`` on the data path (tcp:
   ordered after the pages), else the service sends it on the control channel;
4. ``disconnect(decode_inc)`` when the peer is gone or idle; ``close()`` at shutdown.

Decode side — :class:`RecvBackend`; it allocates the decode KV pool (``storage``), describes
its data endpoint for ``register`` messages, and for transports where the decode side moves
bytes itself (tcp, nccl) runs its own thread that reports through a :class:`RecvSink`:

1. ``start()``; ``expect(room, dst_ids, ...)`` before registering a room;
2. the thread calls ``sink.data_started/data_done/data_failed/garbage`` (thread-safe sinks);
3. ``forget(room)`` returns once nothing writes into that room's pages any more (bounded: at
   most one in-flight message); ``finish(room)`` (nccl) waits for local receives to land;
4. ``close()`` stops the thread, closes sockets and frees (shm: unlinks) the pool.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import TransferError
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.protocol import Done, NcclPlan

Endpoint = Mapping[str, int | str]


@dataclass(frozen=True)
class DecodePeer:
    """A decode incarnation as the prefill side knows it (from its ``register``)."""

    decode_inc: str
    decode_addr: str
    endpoint: Endpoint
    identity: bytes


@dataclass
class SendJob:
    """One rectangle of a room's pages: layers [layer_lo, layer_hi) x positions [pos_lo, pos_hi)."""

    room: int
    decode_inc: str
    src: np.ndarray
    dst: np.ndarray
    layer_lo: int
    layer_hi: int
    pos_lo: int
    pos_hi: int
    cancel: threading.Event
    deadline: float
    ready: Any = None  # a CUDA event to wait on before reading the source pages (nccl streaming)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_pages(self) -> int:
        return (self.layer_hi - self.layer_lo) * 2 * (self.pos_hi - self.pos_lo)


# data thread -> control channel: (decode_inc, room, (layer_lo, layer_hi), [(pos, n), ...]) — the
# nccl plan that must reach the decode before the sends it describes can be matched
PostControl = Callable[[str, int, tuple[int, int], list[tuple[int, int]]], None]


class SendBackend(ABC):
    name: ClassVar[str]

    def __init__(self, config: TransferConfig, store: PageStore, post_control: PostControl) -> None:
        self.config = config
        self.store = store
        self.post_control = post_control

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name}

    def capture_ready_event(self) -> Any:
        """Called on the engine thread by ``on_layer_done``: something the data thread can wait
        on before reading that layer (nccl: a CUDA event on the current stream). Host pools: None."""
        return None

    def ack_endpoint(self, peer: DecodePeer) -> dict[str, int | str]:
        """Extra fields for the ``ack`` of a registration from ``peer`` (loop thread)."""
        return {}

    @abstractmethod
    def connect(self, peer: DecodePeer) -> None: ...

    @abstractmethod
    def send_pages(self, job: SendJob) -> int: ...

    def send_done(self, decode_inc: str, done: Done, deadline: float) -> bool:
        return False

    @abstractmethod
    def disconnect(self, decode_inc: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class RecvSink(Protocol):
    """Thread-safe callbacks from a receive thread into the decode service."""

    def data_started(self, room: int) -> None: ...

    def data_done(self, room: int, done: Done) -> None: ...

    def data_failed(self, room: int, error: TransferError) -> None: ...

    def garbage(self, what: str) -> None: ...


class RecvBackend(ABC):
    name: ClassVar[str]
    # whether this side posts its own asynchronous receives (nccl) that finish() must await
    local_receives: ClassVar[bool] = False

    def __init__(self, config: TransferConfig, store: PageStore, sink: RecvSink) -> None:
        self.config = config
        self.store = store
        self.sink = sink

    @property
    def storage(self) -> torch.Tensor:
        return self.store.storage

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name}

    @abstractmethod
    def endpoint(self) -> dict[str, int | str]: ...

    def start(self) -> None:
        return None

    def expect(self, room: int, decode_inc: str, dst: np.ndarray, prefill_key: str) -> None:
        return None

    def forget(self, room: int) -> None:
        return None

    def on_ack(self, prefill_key: str, prefill_inc: str, endpoint: Endpoint) -> None:
        return None

    def on_plan(self, prefill_key: str, plan: NcclPlan) -> None:
        return None

    def drop_peer(self, prefill_key: str) -> None:
        return None

    def finish(self, room: int, timeout: float) -> bool:
        """Block until this side's own receives for ``room`` have landed (called off-loop);
        False if they did not within ``timeout``."""
        return True

    @abstractmethod
    def close(self) -> None: ...
