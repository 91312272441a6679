"""Decode-side room bookkeeping and control-channel handling (mixed into the decode service).

One :class:`PrefillPeer` per prefill bootstrap address: a DEALER socket (routing id = our
incarnation), a receive task, the prefill incarnation it last named, when it was last heard
from, and its open rooms. :class:`ReceiverControl` holds the per-room state machine:

1. ``arm`` (re)starts the timer of the room's phase; expiry fails the room (``TransferTimeoutError``);
2. ``ack`` -> ``WaitingForInput``; ``begin`` / first tcp frame -> ``Transferring``;
3. ``done`` -> verify (page counts by the backend, checksums, our receives drained) -> ``Success``,
   ``confirm`` to the prefill, the worker's future gets the aux data;
4. ``fail`` -> ``Failed``: the receive backend stops writing the room, the prefill is told
   (``abort``), and when the prefill writes our memory itself (shm, nccl) we wait for its
   ``abort_ack`` (bounded) before the worker's future raises — only then may pages be reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import zmq
import zmq.asyncio

from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import (
    ChecksumError,
    PeerDeadError,
    PeerRestartedError,
    ProtocolError,
    TransferError,
    TransferTimeoutError,
    error_from_wire,
    error_to_wire,
)
from pdserve.kvtransfer.metrics import TransferMetrics
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.protocol import (
    Abort,
    AbortAck,
    Ack,
    AuxData,
    Begin,
    Confirm,
    Done,
    Failed,
    NcclPlan,
    Ping,
    Pong,
    WireError,
    _Wire,
    decode_to_decode,
    encode,
)
from pdserve.kvtransfer.runtime import LoopHandle, log_future_exception
from pdserve.kvtransfer.states import KVPoll, RoomState, StateListener
from pdserve.kvtransfer.transports.base import RecvBackend

logger = logging.getLogger(__name__)

_REMOTE_WRITERS = ("shm", "nccl")


@dataclass
class PrefillPeer:
    key: str
    sock: zmq.asyncio.Socket
    last_heard: float
    last_ping: float = 0.0
    prefill_inc: str | None = None
    rooms: set[int] = field(default_factory=set)
    task: asyncio.Task[Any] | None = None
    closed: bool = False


class RecvRoom:
    def __init__(
        self,
        room: int,
        peer_key: str,
        dst: np.ndarray,
        loop: asyncio.AbstractEventLoop,
        listener: StateListener,
    ) -> None:
        self.room = room
        self.peer_key = peer_key
        self.dst = dst
        self.state = RoomState(listener)
        self.future: asyncio.Future[AuxData] = loop.create_future()
        self.future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        self.timer: asyncio.TimerHandle | None = None
        self.prefill_inc: str | None = None
        self.registered = False
        self.t_first: float | None = None
        self.abort_acked = asyncio.Event()


class ReceiverControl:
    config: TransferConfig
    metrics: TransferMetrics
    handle: LoopHandle
    backend: RecvBackend
    store: PageStore
    rooms: dict[int, RecvRoom]
    peers: dict[str, PrefillPeer]
    incarnation: str
    addr: str

    def spawn(self, coro: Any) -> None:
        raise NotImplementedError

    def protocol_error(self, error: ProtocolError) -> None:
        raise NotImplementedError

    # -- room state -----------------------------------------------------------------------------

    def arm(self, room: RecvRoom) -> None:
        if room.timer is not None:
            room.timer.cancel()
        phase = room.state.phase
        room.timer = self.handle.loop.call_later(self.config.timeout_for(phase), self._expire, room, phase)

    def _expire(self, room: RecvRoom, phase: str) -> None:
        if room.state.value.terminal or room.state.phase != phase:
            return
        what = {
            "bootstrap": "the prefill did not accept the registration",
            "waiting": "the prefill produced no KV",
            "transfer": "the pages did not all arrive",
        }[phase]
        self.fail(
            room,
            TransferTimeoutError(
                f"{what} within {self.config.timeout_for(phase)} s", phase=phase, room=room.room
            ),
        )

    def started(self, room: RecvRoom) -> None:
        if room.t_first is None:
            room.t_first = time.monotonic()
        if room.state.advance(KVPoll.Transferring):
            self.arm(room)

    def fail(self, room: RecvRoom, error: TransferError, notify: bool = True) -> None:
        """Fail ``room``; ``notify=False`` when the prefill already knows or is gone."""
        if not room.state.fail(error):
            return
        if room.timer is not None:
            room.timer.cancel()
        self.metrics.room_failed(error.phase, error.reason)
        log = logger.info if error.reason in ("aborted", "shutdown") else logger.warning
        log("decode room %d failed: %s", room.room, error)
        self.backend.forget(room.room)
        peer = self.peers.get(room.peer_key)
        need_ack = False
        if notify and room.registered and peer is not None and not peer.closed:
            wire = WireError.model_validate(error_to_wire(error))
            self.send(peer, Abort(room=room.room, decode_inc=self.incarnation, error=wire))
            need_ack = self.config.transport in _REMOTE_WRITERS
        if not need_ack:
            room.abort_acked.set()
        self.spawn(self._settle_failed(room, error))

    async def _settle_failed(self, room: RecvRoom, error: TransferError) -> None:
        try:
            await asyncio.wait_for(room.abort_acked.wait(), self.config.abort_timeout_s)
        except TimeoutError:
            logger.error(
                "room %d: prefill did not confirm the abort within %.1f s; releasing its pages",
                room.room,
                self.config.abort_timeout_s,
            )
        if self.backend.local_receives and not await asyncio.to_thread(
            self.backend.finish, room.room, self.config.abort_timeout_s
        ):
            logger.error("room %d: local receives did not drain; releasing its pages", room.room)
        self._settle(room, None, error)

    def _settle(self, room: RecvRoom, aux: AuxData | None, error: TransferError | None) -> None:
        if self.rooms.get(room.room) is room:
            del self.rooms[room.room]
            self.metrics.pages(-room.dst.size)
        peer = self.peers.get(room.peer_key)
        if peer is not None:
            peer.rooms.discard(room.room)
        if not room.future.done():
            if error is not None:
                room.future.set_exception(error)
            elif aux is not None:
                room.future.set_result(aux)

    def on_done(self, room: RecvRoom, done: Done) -> None:
        if room.state.value.terminal:
            return
        if done.room != room.room or done.aux.room != room.room or done.num_pages > room.dst.size:
            self.fail(
                room,
                ProtocolError(
                    f"done names room {done.room}/{done.aux.room} with {done.num_pages} pages",
                    phase=room.state.phase,
                    room=room.room,
                ),
            )
            return
        if room.prefill_inc is not None and done.prefill_inc != room.prefill_inc:
            self.fail(
                room,
                PeerRestartedError("done from another prefill incarnation", phase="transfer", room=room.room),
                notify=False,
            )
            return
        room.prefill_inc = done.prefill_inc
        self.started(room)
        self.spawn(self._verify(room, done))

    async def _verify(self, room: RecvRoom, done: Done) -> None:
        if self.backend.local_receives and not await asyncio.to_thread(
            self.backend.finish, room.room, self.config.transfer_timeout_s
        ):
            self.fail(
                room,
                TransferTimeoutError("local receives did not complete", phase="verify", room=room.room),
            )
            return
        if self.config.checksum:
            if done.checksums is None or len(done.checksums) != self.store.layout.num_layers:
                self.fail(
                    room,
                    ChecksumError("the prefill sent no per-layer checksums", phase="verify", room=room.room),
                )
                return
            mine = await asyncio.to_thread(self.store.layer_checksums, room.dst[: done.num_pages])
            bad = [i for i, (a, b) in enumerate(zip(mine, done.checksums, strict=True)) if a != b]
            if bad:
                self.fail(
                    room,
                    ChecksumError(f"checksum mismatch in layers {bad[:8]}", phase="verify", room=room.room),
                )
                return
        if not room.state.advance(KVPoll.Success):
            return  # failed (e.g. aborted) while verifying
        if room.timer is not None:
            room.timer.cancel()
        self.backend.forget(room.room)
        self.metrics.room_done(done.nbytes, time.monotonic() - (room.t_first or time.monotonic()))
        peer = self.peers.get(room.peer_key)
        if peer is not None:
            self.send(
                peer, Confirm(room=room.room, decode_inc=self.incarnation, prefill_inc=done.prefill_inc)
            )
        self._settle(room, done.aux, None)

    # -- control channel ------------------------------------------------------------------------

    def send(self, peer: PrefillPeer, msg: _Wire) -> None:
        if peer.closed:
            return
        fut = cast("asyncio.Future[Any]", peer.sock.send_multipart(encode(msg)))
        fut.add_done_callback(log_future_exception)

    async def peer_loop(self, peer: PrefillPeer) -> None:
        while True:
            frames = await peer.sock.recv_multipart()
            try:
                msg = decode_to_decode(frames)
                peer.last_heard = time.monotonic()
                self._dispatch(peer, msg)
            except ProtocolError as exc:
                self.protocol_error(exc)
            except Exception:
                logger.exception("decode control channel: error handling a message from %s", peer.key)

    def _dispatch(
        self, peer: PrefillPeer, msg: Ack | Pong | Begin | NcclPlan | Done | Failed | AbortAck
    ) -> None:
        self._check_incarnation(peer, msg.prefill_inc)
        if isinstance(msg, Pong):
            return
        if isinstance(msg, NcclPlan):
            self.backend.on_plan(peer.key, msg)  # even for a dead room: keeps sends and receives paired
            return
        room = self.rooms.get(msg.room)
        if room is None or room.peer_key != peer.key:
            return  # late message for a room that already ended
        if isinstance(msg, AbortAck):
            room.abort_acked.set()
        elif isinstance(msg, Failed):
            room.abort_acked.set()  # the prefill stopped touching the room before saying so
            self.fail(room, error_from_wire(msg.error.model_dump(), room=room.room), notify=False)
        elif room.state.value.terminal:
            return
        elif isinstance(msg, Ack):
            room.prefill_inc = msg.prefill_inc
            self.backend.on_ack(peer.key, msg.prefill_inc, msg.endpoint)
            if room.state.advance(KVPoll.WaitingForInput):
                self.arm(room)
        elif isinstance(msg, Begin):
            room.prefill_inc = room.prefill_inc or msg.prefill_inc
            self.started(room)
        else:
            self.on_done(room, msg)

    def _check_incarnation(self, peer: PrefillPeer, inc: str) -> None:
        old = peer.prefill_inc
        peer.prefill_inc = inc
        if old is None or old == inc:
            return
        logger.warning("prefill %s restarted (incarnation %s replaced %s)", peer.key, inc, old)
        self.backend.drop_peer(peer.key)
        for room_id in list(peer.rooms):
            room = self.rooms.get(room_id)
            if room is not None and room.prefill_inc == old:
                room.abort_acked.set()  # the old process is gone: it writes nothing any more
                self.fail(
                    room,
                    PeerRestartedError(
                        f"prefill {peer.key} restarted (incarnation {inc} replaced {old})",
                        phase=room.state.phase,
                        room=room_id,
                    ),
                    notify=False,
                )

    def close_peer(self, peer: PrefillPeer) -> None:
        if peer.closed:
            return
        peer.closed = True
        if self.peers.get(peer.key) is peer:
            del self.peers[peer.key]
        if peer.task is not None:
            peer.task.cancel()
        peer.sock.close(linger=0)
        self.backend.drop_peer(peer.key)

    def _peer_dead(self, peer: PrefillPeer, silent: float) -> None:
        logger.warning(
            "prefill %s silent for %.1f s: failing its %d rooms", peer.key, silent, len(peer.rooms)
        )
        for room_id in list(peer.rooms):
            room = self.rooms.get(room_id)
            if room is not None:
                room.abort_acked.set()
                self.fail(
                    room,
                    PeerDeadError(
                        f"prefill {peer.key} silent for {silent:.1f} s", phase=room.state.phase, room=room_id
                    ),
                    notify=False,
                )
        self.close_peer(peer)

    async def _tick_loop(self) -> None:
        cfg = self.config
        tick = min(0.25, cfg.heartbeat_interval_s / 2)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for peer in list(self.peers.values()):
                silent = now - peer.last_heard
                if peer.rooms:
                    if silent > cfg.dead_after_s:
                        self._peer_dead(peer, silent)
                        continue
                    if now - peer.last_ping >= cfg.heartbeat_interval_s:
                        peer.last_ping = now
                        self.send(peer, Ping(decode_inc=self.incarnation, decode_addr=self.addr))
                elif silent > cfg.idle_peer_s:
                    self.close_peer(peer)
