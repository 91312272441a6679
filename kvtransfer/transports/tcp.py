"""tcp transport: pyzmq PUSH (prefill data thread) -> PULL (decode receive thread), zero-copy.

Wire (see :mod:`pdserve.kvtransfer.protocol`): per (room, layer, position group) one multipart
message ``[header, K pages, V pages]``; then ``[done header, done json]``.

Prefill side: a group whose source ids are consecutive is sent straight out of the KV pool
(``copy=False``: zmq reads the pages, no staging copy); a scattered group is gathered with one
``np.take`` per (layer, kind) into a buffer zmq sends without copying again. Sends use a short
``SNDTIMEO`` in a loop that checks the room's cancel flag and deadline, so a dead or stuck
decode never blocks the data thread for long.

Decode side: one receive thread owns the PULL socket. For each message it validates the header
(magic, room registered for this decode incarnation, layer and positions inside the room,
no page written twice) and each frame's size, then ``recv_into`` the destination pages directly
when they are consecutive (one copy: zmq buffer -> page), else scatters the frame's rows into
the pages with one numpy fancy assignment (also one copy). Garbage or truncated input fails the
room it names (or is counted and dropped when it names none). ``done`` is checked against the
pages actually received.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import zmq

from pdserve.engine.kv_layout import KVLayout, allocate_kv_storage
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import HandshakeError, ProtocolError, TransferError, TransferTimeoutError
from pdserve.kvtransfer.pages import PageStore, is_consecutive, plan_groups
from pdserve.kvtransfer.protocol import (
    DATA_KIND_DONE,
    DATA_KIND_PAGES,
    Done,
    decode_done,
    pack_data_header,
    unpack_data_header,
)
from pdserve.kvtransfer.transports.base import (
    DecodePeer,
    PostControl,
    RecvBackend,
    RecvSink,
    SendBackend,
    SendJob,
)

logger = logging.getLogger(__name__)

_SEND_POLL_MS = 50
_RECV_POLL_MS = 100


class _Cancelled(Exception):
    pass


class TcpSendBackend(SendBackend):
    name: ClassVar[str] = "tcp"

    def __init__(self, config: TransferConfig, store: PageStore, post_control: PostControl) -> None:
        super().__init__(config, store, post_control)
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket[bytes]] = {}

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "frame_pages": self.config.frame_pages, "peers": len(self._socks)}

    def connect(self, peer: DecodePeer) -> None:
        if peer.decode_inc in self._socks:
            return
        addr = peer.endpoint.get("data_addr")
        if not isinstance(addr, str) or not addr.startswith("tcp://"):
            raise HandshakeError(
                "tcp registration lacks a tcp:// data_addr", side="prefill", phase="bootstrap"
            )
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.tcp_hwm)
        sock.setsockopt(zmq.SNDTIMEO, _SEND_POLL_MS)
        try:
            sock.connect(addr)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise HandshakeError(
                f"bad data address {addr!r}: {exc}", side="prefill", phase="bootstrap"
            ) from exc
        self._socks[peer.decode_inc] = sock
        logger.info("tcp data connection to decode %s at %s", peer.decode_addr, addr)

    def _send(
        self,
        sock: zmq.Socket[bytes],
        frames: list[Any],
        job_room: int,
        cancel: threading.Event,
        deadline: float,
    ) -> None:
        while True:
            try:
                sock.send_multipart(frames, copy=False)
                return
            except zmq.Again:
                if cancel.is_set():
                    raise _Cancelled from None
                if time.monotonic() > deadline:
                    raise TransferTimeoutError(
                        "decode is not draining the data socket",
                        side="prefill",
                        phase="transfer",
                        room=job_room,
                    ) from None

    def send_pages(self, job: SendJob) -> int:
        sock = self._socks.get(job.decode_inc)
        if sock is None:
            raise TransferError("no data connection to this decode", side="prefill", room=job.room)
        store = self.store
        groups = plan_groups(job.src, job.dst, job.pos_lo, job.pos_hi, self.config.frame_pages)
        moved = 0
        try:
            for layer in range(job.layer_lo, job.layer_hi):
                for pos, n in groups:
                    if job.cancel.is_set():
                        return moved
                    ids = job.src[pos : pos + n]
                    header = pack_data_header(DATA_KIND_PAGES, job.room, job.decode_inc, layer, pos, n)
                    if is_consecutive(ids):  # zero-copy straight out of the pool
                        k = store.run_bytes(layer, 0, int(ids[0]), n)
                        v = store.run_bytes(layer, 1, int(ids[0]), n)
                        self._send(sock, [header, k, v], job.room, job.cancel, job.deadline)
                    else:  # one gather per kind into a fresh buffer, which zmq keeps alive until sent
                        stage = np.empty((2, n, store.page_nbytes), dtype=np.uint8)
                        np.take(store.host_pages(layer, 0), ids, axis=0, out=stage[0])
                        np.take(store.host_pages(layer, 1), ids, axis=0, out=stage[1])
                        self._send(
                            sock, [header, stage[0].data, stage[1].data], job.room, job.cancel, job.deadline
                        )
                    moved += 2 * n * store.page_nbytes
        except _Cancelled:
            return moved
        return moved

    def send_done(self, decode_inc: str, done: Done, deadline: float) -> bool:
        sock = self._socks.get(decode_inc)
        if sock is None:
            raise TransferError("no data connection to this decode", side="prefill", room=done.room)
        header = pack_data_header(DATA_KIND_DONE, done.room, decode_inc, 0, 0, 0)
        try:
            self._send(
                sock, [header, done.model_dump_json().encode()], done.room, threading.Event(), deadline
            )
        except _Cancelled:  # pragma: no cover - the private event is never set
            return True
        return True

    def disconnect(self, decode_inc: str) -> None:
        sock = self._socks.pop(decode_inc, None)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        for inc in list(self._socks):
            self.disconnect(inc)
        self._ctx.destroy(linger=0)


@dataclass
class _Slot:
    decode_inc: str
    dst: np.ndarray
    received: np.ndarray  # bool [layers, 2, positions]
    lock: threading.Lock = field(default_factory=threading.Lock)
    dead: bool = False
    started: bool = False


class TcpRecvBackend(RecvBackend):
    name: ClassVar[str] = "tcp"

    def __init__(
        self, config: TransferConfig, layout: KVLayout, num_blocks: int, sink: RecvSink, *, host: str
    ) -> None:
        super().__init__(config, PageStore(layout, allocate_kv_storage(layout, num_blocks)), sink)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, config.tcp_hwm)
        try:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            self._ctx.destroy(linger=0)
            raise HandshakeError(f"cannot bind tcp data socket on {host}: {exc}", phase="setup") from exc
        self.addr = f"tcp://{host}:{self.port}"
        self._slots: dict[int, _Slot] = {}
        self._forgotten: collections.deque[int] = collections.deque(maxlen=4096)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> dict[str, Any]:
        return {"transport": self.name, "data_addr": self.addr, "pool_bytes": self.store.nbytes}

    def endpoint(self) -> dict[str, int | str]:
        return {"data_addr": self.addr}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kv-tcp-recv", daemon=True)
        self._thread.start()

    def expect(self, room: int, decode_inc: str, dst: np.ndarray, prefill_key: str) -> None:
        received = np.zeros((self.store.layout.num_layers, 2, dst.size), dtype=np.bool_)
        with self._lock:
            self._slots[room] = _Slot(decode_inc=decode_inc, dst=dst, received=received)

    def forget(self, room: int) -> None:
        with self._lock:
            slot = self._slots.pop(room, None)
            self._forgotten.append(room)
        if slot is not None:
            with slot.lock:  # waits out a message being written right now
                slot.dead = True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():  # pragma: no cover - the thread polls every 100 ms
                logger.error("tcp receive thread did not stop within 5 s")
        else:
            self._sock.close(linger=0)
        self._ctx.destroy(linger=0)

    # -- receive thread ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(_RECV_POLL_MS):
                    continue
                try:
                    self._message()
                except zmq.ZMQError as exc:
                    if self._stop.is_set():
                        break
                    logger.error("tcp receive error: %s", exc)
                except Exception:  # keep the receive thread alive whatever a peer sends
                    logger.exception("tcp receive thread: unexpected error")
        finally:
            self._sock.close(linger=0)

    def _drain(self) -> None:
        while self._sock.rcvmore:
            self._sock.recv_into(bytearray())

    def _message(self) -> None:
        header = self._sock.recv()
        try:
            kind, room, inc, layer, pos, n = unpack_data_header(header)
        except ProtocolError as exc:
            self._drain()
            self.sink.garbage(exc.message)
            return
        with self._lock:
            slot = self._slots.get(room)
            late = slot is None and room in self._forgotten
        if slot is None or slot.decode_inc != inc:
            self._drain()
            if not late:  # leftovers of an aborted room are expected, anything else is not
                self.sink.garbage("data for an unknown room or another decode incarnation")
            return
        with slot.lock:
            if slot.dead:
                self._drain()
                return
            try:
                if kind == DATA_KIND_PAGES:
                    self._pages(slot, room, layer, pos, n)
                else:
                    done = self._done(slot, room)
                    slot.dead = True
                    self.sink.data_done(room, done)
            except ProtocolError as exc:
                self._drain()
                slot.dead = True
                self.sink.data_failed(room, exc)

    def _bad(self, room: int, what: str) -> ProtocolError:
        return ProtocolError(what, side="decode", phase="transfer", room=room)

    def _pages(self, slot: _Slot, room: int, layer: int, pos: int, n: int) -> None:
        layout = self.store.layout
        if layer >= layout.num_layers or n <= 0 or pos + n > slot.dst.size:
            raise self._bad(room, f"pages outside the room (layer {layer}, positions {pos}+{n})")
        if slot.received[layer, :, pos : pos + n].any():
            raise self._bad(room, f"pages sent twice (layer {layer}, positions {pos}+{n})")
        if not slot.started:
            slot.started = True
            self.sink.data_started(room)
        ids = slot.dst[pos : pos + n]
        expected = n * self.store.page_nbytes
        consecutive = is_consecutive(ids)
        for kind in (0, 1):
            if not self._sock.rcvmore:
                raise self._bad(room, "truncated message: missing page frames")
            if consecutive:  # straight into the pages: zmq's buffer -> page, one copy
                got = self._sock.recv_into(self.store.run_bytes(layer, kind, int(ids[0]), n))
            else:  # scatter rows out of zmq's buffer, one copy
                frame = self._sock.recv(copy=False)
                got = len(frame.buffer)
                if got == expected:
                    rows = np.frombuffer(frame.buffer, dtype=np.uint8).reshape(n, self.store.page_nbytes)
                    self.store.host_pages(layer, kind)[ids] = rows
            if got != expected:
                raise self._bad(room, f"page frame of {got} bytes, expected {expected}")
        if self._sock.rcvmore:
            raise self._bad(room, "extra frames after the V pages")
        slot.received[layer, :, pos : pos + n] = True

    def _done(self, slot: _Slot, room: int) -> Done:
        if not self._sock.rcvmore:
            raise self._bad(room, "done header without payload")
        payload = self._sock.recv()
        if self._sock.rcvmore:
            raise self._bad(room, "extra frames after done")
        done = decode_done(payload)
        if done.room != room or done.aux.room != room:
            raise self._bad(room, f"done for room {done.room} / aux room {done.aux.room} on room {room}")
        if done.num_pages > slot.dst.size:
            raise self._bad(room, f"done claims {done.num_pages} pages, {slot.dst.size} registered")
        got = slot.received[:, :, : done.num_pages]
        if not got.all() or slot.received[:, :, done.num_pages :].any():
            missing = int(got.size - got.sum())
            raise self._bad(
                room, f"done but {missing} of {got.size} pages never arrived (truncated transfer)"
            )
        return done
