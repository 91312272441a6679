"""The prefill side's book of decode peers, parked registrations and tombstones.

Mixed into :class:`~pdserve.kvtransfer.bootstrap.BootstrapEndpoint`. Lifecycle of what it holds:

1. a decode incarnation's first ``register`` creates its record (``touch``); a new incarnation
   at a known address replaces the old one, whose rooms fail with ``PeerRestartedError``;
2. a registration for a room the prefill worker has not opened is *parked* (``pending``) until
   ``create_sender`` adopts it or ``bootstrap_timeout_s`` expires (the decode is told);
3. a room that fails before its prefill request arrives leaves a *tombstone* for
   ``bootstrap_timeout_s``, so the late request fails at once instead of waiting;
4. the ticker fails the rooms of a decode silent for ``heartbeat_interval_s *
   heartbeat_misses`` (``PeerDeadError``) and forgets idle decodes (dropping their data
   connections / shm mappings).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pdserve.kvtransfer.errors import PeerDeadError, PeerRestartedError, TransferError, TransferTimeoutError
from pdserve.kvtransfer.protocol import Register
from pdserve.kvtransfer.sender import SendRoom
from pdserve.kvtransfer.transports.base import DecodePeer

if TYPE_CHECKING:
    from pdserve.kvtransfer.prefill import PrefillTransferService

logger = logging.getLogger(__name__)

_MAX_TOMBSTONES = 65536


def _dead_error(message: str, phase: str, room: int) -> TransferError:
    return PeerDeadError(message, side="prefill", phase=phase, room=room)


@dataclass
class DecodeRecord:
    peer: DecodePeer
    last_seen: float
    rooms: set[int] = field(default_factory=set)


@dataclass
class PendingRegistration:
    peer: DecodePeer
    dst: np.ndarray
    checksum: bool
    timer: asyncio.TimerHandle


class DecodePeers:
    svc: PrefillTransferService
    pending: dict[int, PendingRegistration]
    decodes: dict[str, DecodeRecord]
    by_addr: dict[str, str]
    tombstones: dict[int, tuple[TransferError, float]]

    def send_failed(self, identity: bytes, room: int, error: TransferError) -> None:
        raise NotImplementedError

    def bind(self, room: SendRoom, peer: DecodePeer, dst: np.ndarray, checksum: bool) -> None:
        raise NotImplementedError

    def touch(self, identity: bytes, msg: Register) -> DecodeRecord:
        now = time.monotonic()
        d = self.decodes.get(msg.decode_inc)
        if d is not None:
            d.last_seen = now
            return d
        old = self.by_addr.get(msg.decode_addr)
        if old is not None and old != msg.decode_inc:
            logger.warning(
                "decode at %s restarted (incarnation %s replaced %s)", msg.decode_addr, msg.decode_inc, old
            )
            self.drop_decode(
                old,
                lambda phase, room: PeerRestartedError(
                    f"decode at {msg.decode_addr} restarted (incarnation {msg.decode_inc} replaced {old})",
                    side="prefill",
                    phase=phase,
                    room=room,
                ),
                reply="none",
            )
        peer = DecodePeer(msg.decode_inc, msg.decode_addr, dict(msg.endpoint), identity)
        d = self.decodes[msg.decode_inc] = DecodeRecord(peer, now)
        self.svc.prepare(peer)  # map its segment / connect its data socket before the first pages
        self.by_addr[msg.decode_addr] = msg.decode_inc
        return d

    def adopt_pending(self, room: SendRoom) -> None:
        """A new sender picks up a registration (or a failure) that arrived before it."""
        tomb = self.tombstones.pop(room.room, None)
        if tomb is not None:
            self.svc.fail(room, tomb[0], reply="none")
            return
        p = self.pending.pop(room.room, None)
        if p is not None:
            p.timer.cancel()
            self.bind(room, p.peer, p.dst, p.checksum)

    def reject_pending(self, room: int, error: TransferError) -> None:
        p = self.pending.pop(room, None)
        if p is not None:
            p.timer.cancel()
            self.send_failed(p.peer.identity, room, error)

    def _expire_pending(self, room: int) -> None:
        p = self.pending.pop(room, None)
        if p is None:
            return
        error = TransferTimeoutError(
            f"the prefill never received the request within {self.svc.config.bootstrap_timeout_s} s",
            side="prefill",
            phase="bootstrap",
            room=room,
        )
        self.svc.metrics.room_failed("bootstrap", "timeout")
        self.tombstone(room, error)
        self.send_failed(p.peer.identity, room, error)

    def tombstone(self, room: int, error: TransferError) -> None:
        if len(self.tombstones) >= _MAX_TOMBSTONES:
            self.tombstones.pop(next(iter(self.tombstones)))
        self.tombstones[room] = (error, time.monotonic() + self.svc.config.bootstrap_timeout_s)

    def room_gone(self, room: SendRoom) -> None:
        if room.peer is not None:
            d = self.decodes.get(room.peer.decode_inc)
            if d is not None:
                d.rooms.discard(room.room)

    def drop_decode(self, inc: str, make_error: Callable[[str, int], TransferError], reply: str) -> None:
        """Forget a decode incarnation: fail its rooms (``make_error(phase, room)``) and parked
        registrations, and drop its data connection."""
        d = self.decodes.pop(inc, None)
        if d is None:
            return
        if self.by_addr.get(d.peer.decode_addr) == inc:
            del self.by_addr[d.peer.decode_addr]
        for room_id in list(d.rooms):
            room = self.svc.rooms.get(room_id)
            if room is not None:
                self.svc.fail(room, make_error(room.state.phase, room_id), reply=reply)
        for room_id, p in list(self.pending.items()):
            if p.peer.decode_inc == inc:
                p.timer.cancel()
                del self.pending[room_id]
                self.tombstone(room_id, make_error("bootstrap", room_id))
        self.svc.disconnect_later(inc)

    async def tick_loop(self) -> None:
        cfg = self.svc.config
        tick = min(0.25, cfg.heartbeat_interval_s / 2)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            pending_incs = {p.peer.decode_inc for p in self.pending.values()}
            for inc, d in list(self.decodes.items()):
                busy = bool(d.rooms) or inc in pending_incs
                silent = now - d.last_seen
                if busy and silent > cfg.dead_after_s:
                    logger.warning(
                        "decode %s (%s) silent for %.1f s: failing its rooms", d.peer.decode_addr, inc, silent
                    )
                    self.drop_decode(
                        inc,
                        functools.partial(
                            _dead_error, f"decode {d.peer.decode_addr} silent for {silent:.1f} s"
                        ),
                        reply="failed",
                    )
                elif not busy and silent > cfg.idle_peer_s:
                    self.decodes.pop(inc, None)
                    if self.by_addr.get(d.peer.decode_addr) == inc:
                        del self.by_addr[d.peer.decode_addr]
                    self.svc.disconnect_later(inc)
            for room_id in [r for r, (_, exp) in self.tombstones.items() if exp < now]:
                del self.tombstones[room_id]
