"""nccl transport: GPU point-to-point between a prefill and a decode, same rendezvous as the rest.

Lifecycle per (prefill incarnation, decode incarnation) pair:

1. the decode's first ``register`` reaches the prefill; its ``ack`` carries a fresh NCCL unique
   id (``ack_endpoint``); the decode's NCCL thread joins the 2-rank communicator as rank 1
   while the prefill's data thread joins as rank 0 before its first send (non-blocking init,
   bounded by ``bootstrap_timeout_s``);
2. for each job the prefill posts a ``nccl`` plan on the control channel (room, layers,
   position groups) *before* issuing the sends; the decode's NCCL thread posts the matching
   receives in plan order, so sends and receives always pair up. Consecutive pages go straight
   from/to the pool; scattered groups are gathered/scattered on the transfer stream;
3. with layer streaming the prefill records a CUDA event in ``on_layer_done`` on the engine's
   stream and the transfer stream waits on it before reading that layer;
4. ``done`` travels on the control channel; the decode's ``finish(room)`` waits for its own
   receives (a CUDA event per room) before verification;
5. a room that fails mid-way keeps its announced receives paired: they land in a scratch buffer
   instead of the (possibly reused) destination pages. A communicator error aborts the
   communicator; the next room re-creates it.

No GPU here: the control logic runs on CPU with :class:`LoopbackP2P`; the CUDA data path is
exercised by the GPU-marked test when a GPU is present.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import HandshakeError, TransferError, TransportError, TransportUnavailableError
from pdserve.kvtransfer.pages import PageStore, is_consecutive, plan_groups
from pdserve.kvtransfer.protocol import NcclPlan
from pdserve.kvtransfer.runtime import DataThread
from pdserve.kvtransfer.transports.base import (
    DecodePeer,
    Endpoint,
    PostControl,
    RecvBackend,
    RecvSink,
    SendBackend,
    SendJob,
)
from pdserve.kvtransfer.transports.nccl_lib import LoopbackP2P, NcclLibrary, P2PLib

logger = logging.getLogger(__name__)


def _load(config: TransferConfig, lib: P2PLib | None, device: torch.device) -> P2PLib:
    if lib is not None:
        return lib
    if device.type != "cuda" or not torch.cuda.is_available():
        raise TransportUnavailableError(
            f"transport 'nccl' needs a CUDA device (KV pool on {device}, cuda available: "
            f"{torch.cuda.is_available()})",
            phase="setup",
        )
    return NcclLibrary(config.nccl_library)


def _wait_event(event: Any, timeout: float) -> bool:
    if event is None:
        return True
    deadline = time.monotonic() + timeout
    while not event.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


class NcclSendBackend(SendBackend):
    name: ClassVar[str] = "nccl"

    def __init__(
        self, config: TransferConfig, store: PageStore, post_control: PostControl, lib: P2PLib | None = None
    ) -> None:
        super().__init__(config, store, post_control)
        self.lib = _load(config, lib, store.storage.device)
        self._uids: dict[str, bytes] = {}
        self._comms: dict[str, Any] = {}
        self._stream: Any = torch.cuda.Stream(store.storage.device) if store.is_cuda else None

    def describe(self) -> dict[str, Any]:
        return {
            "transport": self.name,
            "library": self.lib.name,
            "device": str(self.store.storage.device),
            "communicators": len(self._comms),
        }

    def ack_endpoint(self, peer: DecodePeer) -> dict[str, int | str]:
        uid = self._uids.get(peer.decode_inc)
        if uid is None:
            uid = self._uids[peer.decode_inc] = self.lib.unique_id()
        return {"nccl_uid": uid.hex()}

    def capture_ready_event(self) -> Any:
        if not self.store.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.store.storage.device))
        return event

    def connect(self, peer: DecodePeer) -> None:
        if peer.decode_inc in self._comms:
            return
        uid = self._uids.get(peer.decode_inc)
        if uid is None:
            raise HandshakeError("no NCCL unique id for this decode", side="prefill", phase="bootstrap")
        self._comms[peer.decode_inc] = self.lib.init_comm(uid, 2, 0, self.config.bootstrap_timeout_s)
        logger.info("NCCL communicator with decode %s ready", peer.decode_addr)

    def send_pages(self, job: SendJob) -> int:
        comm = self._comms.get(job.decode_inc)
        if comm is None or job.cancel.is_set():
            return 0
        groups = plan_groups(job.src, job.dst, job.pos_lo, job.pos_hi, self.config.frame_pages)
        # announce first: the decode posts receives in exactly this order
        self.post_control(job.decode_inc, job.room, (job.layer_lo, job.layer_hi), groups)
        stream, keep = self._stream, []
        if stream is not None and job.ready is not None:
            stream.wait_event(job.ready)
        ctx = torch.cuda.stream(stream) if stream is not None else _Null()
        try:
            with ctx:
                self.lib.group_start()
                for layer in range(job.layer_lo, job.layer_hi):
                    for pos, n in groups:
                        ids = job.src[pos : pos + n]
                        for kind in (0, 1):
                            if is_consecutive(ids):
                                tensor = self.store.run(layer, kind, int(ids[0]), n)
                            else:
                                index = torch.from_numpy(ids).to(self.store.pages.device)
                                tensor = self.store.pages[layer, kind].index_select(0, index)
                                keep.append(tensor)
                            self.lib.send(comm, tensor, 1, stream)
                self.lib.group_end()
            self.lib.wait(comm, job.deadline - time.monotonic())
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
                if not _wait_event(done, max(0.0, job.deadline - time.monotonic())):
                    raise TransportError("NCCL sends did not complete", side="prefill", room=job.room)
        except TransferError:
            self._drop(job.decode_inc)
            raise
        return job.num_pages * self.store.page_nbytes

    def _drop(self, decode_inc: str) -> None:
        comm = self._comms.pop(decode_inc, None)
        if comm is not None:
            self.lib.abort(comm)

    def disconnect(self, decode_inc: str) -> None:
        self._drop(decode_inc)
        self._uids.pop(decode_inc, None)

    def close(self) -> None:
        for inc in list(self._comms):
            self._drop(inc)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass
class _RecvRoom:
    dst: np.ndarray
    key: str


class NcclRecvBackend(RecvBackend):
    name: ClassVar[str] = "nccl"
    local_receives: ClassVar[bool] = True

    def __init__(
        self,
        config: TransferConfig,
        layout: KVLayout,
        num_blocks: int,
        sink: RecvSink,
        lib: P2PLib | None = None,
    ) -> None:
        device = torch.device("cpu") if isinstance(lib, LoopbackP2P) else torch.device(config.device)
        self.lib = _load(config, lib, device)
        super().__init__(config, PageStore(layout, allocate_kv_storage(layout, num_blocks, device)), sink)
        self._stream: Any = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = DataThread("kv-nccl-recv")
        self._comms: dict[str, tuple[str, Any]] = {}  # prefill key -> (uid hex, comm)
        self._rooms: dict[int, _RecvRoom] = {}
        self._last_event: dict[int, Any] = {}  # room -> CUDA event after its latest posted receives
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "transport": self.name,
            "library": self.lib.name,
            "device": str(self.store.storage.device),
            "communicators": len(self._comms),
        }

    def endpoint(self) -> dict[str, int | str]:
        return {"device": str(self.store.storage.device)}

    def start(self) -> None:
        self._thread.start()

    def expect(self, room: int, decode_inc: str, dst: np.ndarray, prefill_key: str) -> None:
        with self._lock:
            self._rooms[room] = _RecvRoom(dst=dst, key=prefill_key)

    def forget(self, room: int) -> None:
        """Later plans for ``room`` land in scratch; receives already posted are awaited by finish()."""
        with self._lock:
            self._rooms.pop(room, None)

    def on_ack(self, prefill_key: str, prefill_inc: str, endpoint: Endpoint) -> None:
        uid = endpoint.get("nccl_uid")
        if not isinstance(uid, str):
            return
        current = self._comms.get(prefill_key)
        if current is not None and current[0] == uid:
            return
        self._comms[prefill_key] = (uid, None)
        self._thread.submit(lambda: self._init(prefill_key, uid))

    def _init(self, key: str, uid: str) -> None:
        try:
            comm = self.lib.init_comm(bytes.fromhex(uid), 2, 1, self.config.bootstrap_timeout_s)
        except TransferError as exc:
            logger.error("NCCL communicator with prefill %s failed: %s", key, exc)
            self._comms.pop(key, None)
            return
        if self._comms.get(key, ("", None))[0] == uid:
            self._comms[key] = (uid, comm)

    def on_plan(self, prefill_key: str, plan: NcclPlan) -> None:
        self._thread.submit(lambda: self._post(prefill_key, plan))

    def _post(self, key: str, plan: NcclPlan) -> None:
        uid_comm = self._comms.get(key)
        with self._lock:
            entry = self._rooms.get(plan.room)
        if uid_comm is None or uid_comm[1] is None:
            logger.error("NCCL plan for room %d without a communicator to %s", plan.room, key)
            if entry is not None:
                self.sink.data_failed(plan.room, TransportError("no NCCL communicator", room=plan.room))
            return
        comm, stream = uid_comm[1], self._stream
        if entry is not None:
            self.sink.data_started(plan.room)
        scatters: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        ctx = torch.cuda.stream(stream) if stream is not None else _Null()
        try:
            with ctx:
                self.lib.group_start()
                for layer in range(*plan.layers):
                    for pos, n in plan.groups:
                        alive = (
                            entry is not None
                            and pos + n <= entry.dst.size
                            and layer < self.store.layout.num_layers
                        )
                        ids = entry.dst[pos : pos + n] if entry is not None and alive else None
                        for kind in (0, 1):
                            if ids is not None and is_consecutive(ids):
                                target = self.store.run(layer, kind, int(ids[0]), n)
                            else:
                                target = torch.empty(
                                    (n, self.store.layout.page_numel),
                                    dtype=self.store.pages.dtype,
                                    device=self.store.pages.device,
                                )
                                if ids is not None:
                                    index = torch.from_numpy(ids).to(self.store.pages.device)
                                    scatters.append((layer, kind, index, target))
                            self.lib.recv(comm, target, 0, stream, self.config.transfer_timeout_s)
                self.lib.group_end()
                for layer, kind, index, target in scatters:
                    self.store.pages[layer, kind].index_copy_(0, index, target)
            self.lib.wait(comm, self.config.transfer_timeout_s)
        except TransferError as exc:
            self.lib.abort(comm)
            self._comms.pop(key, None)
            if entry is not None:
                self.sink.data_failed(plan.room, exc)
            return
        if entry is not None and stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            with self._lock:
                self._last_event[plan.room] = event

    def finish(self, room: int, timeout: float) -> bool:
        mark = threading.Event()
        self._thread.submit(mark.set)  # every plan received so far has been posted after this
        if not mark.wait(timeout):
            return False
        with self._lock:
            event = self._last_event.pop(room, None)
        return _wait_event(event, timeout)

    def drop_peer(self, prefill_key: str) -> None:
        uid_comm = self._comms.pop(prefill_key, None)
        if uid_comm is not None and uid_comm[1] is not None:
            comm = uid_comm[1]
            self._thread.submit(lambda: self.lib.abort(comm))

    def close(self) -> None:
        for key in list(self._comms):
            self.drop_peer(key)
        self._thread.stop(10.0)
