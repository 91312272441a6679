"""The prefill side's bootstrap endpoint: a zmq ROUTER on the bootstrap port.

Lifecycle:

1. ``start()`` binds ``tcp://host:port`` (anything probing the port finds a listener) and runs
   a receive task and a ticker task on the service's loop;
2. each decode incarnation connects a DEALER whose routing id is its incarnation; its first
   ``register`` creates a peer record (address, data endpoint). A *new* incarnation at a known
   address means the old one restarted: its rooms fail with ``PeerRestartedError`` at once;
3. ``register`` is checked (layout incl. tp rank/size, transport) and answered ``ack`` or
   ``failed``; registrations for rooms the prefill worker has not opened yet are parked for
   ``bootstrap_timeout_s`` and then failed back to the decode (half-dispatched request);
4. the ticker declares a decode with open rooms dead after ``heartbeat_interval_s *
   heartbeat_misses`` of silence, forgets idle peers, and expires tombstones (rooms that
   failed before the prefill request arrived, so that request fails at once when it does);
5. ``close()`` cancels the tasks and closes the socket and context.

Malformed messages are counted (``protocol_errors_total``) and dropped; they never reach a room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zmq
import zmq.asyncio

from pdserve.engine.kv_layout import KVLayout
from pdserve.errors import PdserveError
from pdserve.kvtransfer.decode_peers import DecodePeers, DecodeRecord, PendingRegistration
from pdserve.kvtransfer.errors import (
    HandshakeError,
    ProtocolError,
    RoomError,
    TransferError,
    TransferLayoutMismatchError,
    error_from_wire,
    error_to_wire,
)
from pdserve.kvtransfer.protocol import (
    Abort,
    AbortAck,
    Ack,
    Begin,
    Confirm,
    Done,
    Failed,
    NcclPlan,
    Ping,
    Pong,
    Register,
    WireError,
    _Wire,
    decode_to_prefill,
    encode,
)
from pdserve.kvtransfer.runtime import log_future_exception
from pdserve.kvtransfer.sender import SendRoom
from pdserve.kvtransfer.states import KVPoll
from pdserve.kvtransfer.transports.base import DecodePeer

if TYPE_CHECKING:
    from pdserve.kvtransfer.prefill import PrefillTransferService

logger = logging.getLogger(__name__)


class BootstrapEndpoint(DecodePeers):
    def __init__(self, svc: PrefillTransferService, *, host: str, port: int) -> None:
        self.svc = svc
        self.host = host
        self.port = port
        self.pending: dict[int, PendingRegistration] = {}
        self.decodes: dict[str, DecodeRecord] = {}
        self.by_addr: dict[str, str] = {}
        self.tombstones: dict[int, tuple[TransferError, float]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._ctx.destroy(linger=0)
            self._ctx = None
            raise HandshakeError(
                f"cannot bind bootstrap endpoint {self.host}:{self.port}: {exc}",
                side="prefill",
                phase="setup",
            ) from exc
        self._sock = sock
        for coro in (self._recv_loop(), self.tick_loop()):
            task = asyncio.get_running_loop().create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)
        for p in self.pending.values():
            p.timer.cancel()
        self.pending.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    # -- sending --------------------------------------------------------------------------------

    def _send(self, identity: bytes, msg: _Wire) -> None:
        if self._sock is None:
            return
        fut = cast("asyncio.Future[Any]", self._sock.send_multipart([identity, *encode(msg)]))
        fut.add_done_callback(log_future_exception)

    def send_failed(self, identity: bytes, room: int, error: TransferError) -> None:
        wire = WireError.model_validate(error_to_wire(error))
        self._send(identity, Failed(room=room, prefill_inc=self.svc.incarnation, error=wire))

    def send_abort_ack(self, identity: bytes, room: int) -> None:
        self._send(identity, AbortAck(room=room, prefill_inc=self.svc.incarnation))

    def send_plan(self, decode_inc: str, plan: NcclPlan) -> None:
        d = self.decodes.get(decode_inc)
        if d is not None:
            self._send(d.peer.identity, plan)

    def on_begin(self, room: SendRoom) -> None:
        if room.state.value.terminal or room.peer is None:
            return
        if room.state.advance(KVPoll.Transferring):
            self.svc.arm(room)
        self._send(room.peer.identity, Begin(room=room.room, prefill_inc=self.svc.incarnation))

    def on_done_sent(self, room: SendRoom, done: Done, delivered: bool) -> None:
        if not room.state.value.terminal and room.peer is not None and not delivered:
            self._send(room.peer.identity, done)

    # -- receiving ------------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        sock = self._sock
        if sock is None:  # pragma: no cover - started before the task
            return
        while True:
            frames = await sock.recv_multipart()
            try:
                if len(frames) < 2:
                    raise ProtocolError("message without routing id", side="prefill")
                identity, msg = frames[0], decode_to_prefill(frames[1:])
                if identity != msg.decode_inc.encode():
                    raise ProtocolError("routing id does not match the decode incarnation", side="prefill")
                self._dispatch(identity, msg)
            except ProtocolError as exc:
                self.svc.metrics.protocol_error()
                logger.warning("bootstrap endpoint dropped a message: %s", exc.message)
            except Exception:
                logger.exception("bootstrap endpoint: error handling a message")

    def _dispatch(self, identity: bytes, msg: Register | Ping | Confirm | Abort) -> None:
        if isinstance(msg, Ping):
            d = self.decodes.get(msg.decode_inc)
            if d is not None:
                d.last_seen = time.monotonic()
            self._send(identity, Pong(prefill_inc=self.svc.incarnation))
        elif isinstance(msg, Register):
            self._on_register(identity, msg)
        elif isinstance(msg, Confirm):
            self._on_confirm(msg)
        else:
            self._on_abort(identity, msg)

    def _check(self, msg: Register) -> TransferError | None:
        try:
            remote = KVLayout.from_dict(dict(msg.layout))
            self.svc.layout.check_compatible(remote)
        except PdserveError as exc:
            return TransferLayoutMismatchError(
                f"decode {msg.decode_addr}: {exc.message}", side="prefill", phase="bootstrap", room=msg.room
            )
        if msg.transport != self.svc.config.transport:
            return HandshakeError(
                f"decode uses transport {msg.transport!r}, this prefill {self.svc.config.transport!r}",
                side="prefill",
                phase="bootstrap",
                room=msg.room,
            )
        if len(set(msg.dst_blocks)) != len(msg.dst_blocks):
            return RoomError(
                "duplicate destination block ids", side="prefill", phase="bootstrap", room=msg.room
            )
        return None

    def _on_register(self, identity: bytes, msg: Register) -> None:
        d = self.touch(identity, msg)
        room = self.svc.rooms.get(msg.room)
        error = self._check(msg)
        if error is None and room is not None and room.peer is not None:
            if room.peer.decode_inc == msg.decode_inc:
                return  # a resend of a registration we already hold
            error = RoomError(
                "room already registered by another decode", side="prefill", phase="bootstrap", room=msg.room
            )
        if error is None and room is not None and room.state.value.terminal:
            error = room.state.error or TransferError("room already finished", side="prefill", room=msg.room)
        if error is None and room is None:
            tomb = self.tombstones.get(msg.room)
            if tomb is not None:
                error = tomb[0]
            elif msg.room in self.pending:
                if self.pending[msg.room].peer.decode_inc != msg.decode_inc:
                    error = RoomError(
                        "room already registered by another decode",
                        side="prefill",
                        phase="bootstrap",
                        room=msg.room,
                    )
                else:
                    return
        if error is not None:
            logger.warning("refused registration of room %d: %s", msg.room, error)
            self.send_failed(identity, msg.room, error)
            if room is not None and room.peer is None:
                self.svc.fail(room, error, reply="none")
            elif room is None:
                self.tombstone(msg.room, error)
            return
        dst = np.asarray(msg.dst_blocks, dtype=np.int64)
        checksum = msg.checksum or self.svc.config.checksum
        if room is None:
            timer = self.svc.handle.loop.call_later(
                self.svc.config.bootstrap_timeout_s, self._expire_pending, msg.room
            )
            self.pending[msg.room] = PendingRegistration(d.peer, dst, checksum, timer)
        else:
            self.bind(room, d.peer, dst, checksum)
        self._send(
            identity,
            Ack(
                room=msg.room,
                prefill_inc=self.svc.incarnation,
                endpoint=self.svc.backend.ack_endpoint(d.peer),
            ),
        )

    def bind(self, room: SendRoom, peer: DecodePeer, dst: np.ndarray, checksum: bool) -> None:
        with room.lock:
            room.peer, room.dst, room.checksum = peer, dst, checksum
        d = self.decodes.get(peer.decode_inc)
        if d is not None:
            d.rooms.add(room.room)
        self.svc.attach(room)

    def _on_confirm(self, msg: Confirm) -> None:
        room = self.svc.rooms.get(msg.room)
        if (
            room is None
            or room.peer is None
            or room.peer.decode_inc != msg.decode_inc
            or msg.prefill_inc != self.svc.incarnation
        ):
            return  # late or stale: the room already ended
        if not room.done_queued:
            self.svc.fail(
                room,
                ProtocolError(
                    "decode confirmed before the done was sent",
                    side="prefill",
                    phase=room.state.phase,
                    room=room.room,
                ),
            )
            return
        self.svc.succeed(room)

    def _on_abort(self, identity: bytes, msg: Abort) -> None:
        room = self.svc.rooms.get(msg.room)
        error = error_from_wire(msg.error.model_dump(), room=msg.room)
        if room is not None and room.peer is not None and room.peer.decode_inc == msg.decode_inc:
            self.svc.fail(room, error, reply="abort_ack")
            return
        p = self.pending.get(msg.room)
        if p is not None and p.peer.decode_inc == msg.decode_inc:
            p.timer.cancel()
            del self.pending[msg.room]
        if room is None:
            self.tombstone(msg.room, error)  # the prefill request may still be on its way
        self.send_abort_ack(identity, msg.room)
