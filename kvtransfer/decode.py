"""``DecodeTransferService``: the decode worker's KV pool owner and KV receiver.

Lifecycle:

1. ``DecodeTransferService(config, layout, num_blocks, registry=..., host, advertise_addr)``
   allocates the decode KV pool through the transport (shm: a shared-memory segment; tcp/fake:
   private memory; nccl: GPU memory) — ``kv_storage`` is what the decode engine must use;
2. ``await start()`` starts the receive thread (tcp), the heartbeat/timeout ticker, and logs
   ``describe()``;
3. per request, after reserving pages: ``aux = await receive(bootstrap_host, bootstrap_port,
   room, dst_block_ids)`` — decode-first rendezvous. Room states and what moves them:

   * ``Bootstrapping``: ``register`` sent to the prefill's bootstrap endpoint (one DEALER per
     prefill address, shared by its rooms); ends on ``ack`` (bootstrap timeout);
   * ``WaitingForInput``: the prefill knows our pages and computes; ends on the first page
     (``begin`` or a tcp frame) (waiting timeout);
   * ``Transferring``: pages land; ends on ``done`` + local verification: page counts,
     checksums when enabled, our own receives drained (transfer timeout);
   * ``Success``: ``confirm`` goes back, ``receive`` returns the aux data.

   When ``receive`` returns *or raises*, nothing writes into ``dst_block_ids`` any more, so the
   worker may free or adopt them. On failure the prefill is told (``abort``); with transports
   where the prefill writes our memory (shm, nccl) we wait up to ``abort_timeout_s`` for its
   ``abort_ack`` first. Cancelling the awaiting task aborts the room the same way.
4. ``abort(room)`` from any thread; heartbeats: a prefill with open rooms gets a ``ping`` every
   ``heartbeat_interval_s``; silence for ``heartbeat_misses`` intervals fails its rooms
   (``PeerDeadError``); a ``pong``/``ack`` naming a new incarnation fails the rooms the old one
   accepted (``PeerRestartedError``);
5. ``await close()`` aborts open rooms, closes sockets, stops threads and frees the pool
   (shm: unlinked).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from pdserve.engine.kv_layout import KVLayout
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import (
    HandshakeError,
    ProtocolError,
    RoomError,
    TransferAbortedError,
    TransferError,
)
from pdserve.kvtransfer.metrics import TransferMetrics
from pdserve.kvtransfer.pages import as_block_array
from pdserve.kvtransfer.protocol import MAX_ROOM, AuxData, Done, Register
from pdserve.kvtransfer.receiver import PrefillPeer, ReceiverControl, RecvRoom
from pdserve.kvtransfer.runtime import LoopHandle, fail_all_rooms, state_counts, wait_until
from pdserve.kvtransfer.states import KVPoll
from pdserve.kvtransfer.transports import make_recv_backend

logger = logging.getLogger(__name__)


class DecodeTransferService(ReceiverControl):
    def __init__(
        self,
        config: TransferConfig,
        layout: KVLayout,
        num_blocks: int,
        *,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        advertise_addr: str | None = None,
        nccl_lib: Any = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.incarnation = uuid.uuid4().hex
        self.host = host
        self.addr = advertise_addr or f"{host}/pid{os.getpid()}"
        self.registry = registry
        self.metrics = TransferMetrics(registry, side="decode", transport=config.transport)
        self.handle = LoopHandle()
        self.backend = make_recv_backend(
            config, layout, num_blocks, incarnation=self.incarnation, sink=self, host=host, nccl_lib=nccl_lib
        )
        self.store = self.backend.store
        self.rooms: dict[int, RecvRoom] = {}
        self.peers: dict[str, PrefillPeer] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self._closing = False

    @property
    def kv_storage(self) -> torch.Tensor:
        """The decode KV pool (``kv[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``)."""
        return self.backend.storage

    @property
    def num_blocks(self) -> int:
        return self.store.num_blocks

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.handle.bind()
        self._ctx = zmq.asyncio.Context()
        self.backend.start()
        self.spawn(self._tick_loop())
        logger.info("kvtransfer decode service up: %s", self.describe())

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        within = self.config.abort_timeout_s + 1.0
        await fail_all_rooms(self.rooms, self.fail, side="decode", within_s=within)
        for peer in list(self.peers.values()):
            self.close_peer(peer)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)
        await asyncio.to_thread(self.backend.close)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        logger.info("kvtransfer decode service closed")

    def describe(self) -> dict[str, Any]:
        return {
            "side": "decode",
            "transport": self.config.transport,
            "incarnation": self.incarnation,
            "address": self.addr,
            "layout": self.layout.to_dict(),
            "num_blocks": self.num_blocks,
            "checksum": self.config.checksum,
            "rooms": state_counts(self.rooms.values()),
            "pages_held": self.pages_held(),
            "prefill_peers": len(self.peers),
            "backend": self.backend.describe(),
        }

    def pages_held(self) -> int:
        return sum(room.dst.size for room in self.rooms.values())

    def spawn(self, coro: Any) -> None:
        task = self.handle.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- worker API -----------------------------------------------------------------------------

    async def receive(
        self, bootstrap_host: str, bootstrap_port: int, room: int, dst_block_ids: Sequence[int] | np.ndarray
    ) -> AuxData:
        """Receive ``room``'s KV into ``dst_block_ids`` (token order); returns the aux data.

        Raises a :class:`TransferError` subclass; either way the pages are no longer written."""
        if not isinstance(room, int) or not 0 <= room <= MAX_ROOM:
            raise RoomError(f"bootstrap_room must be an int in [0, 2^63), got {room!r}", phase="setup")
        if room in self.rooms:
            raise RoomError("room already open on this decode", phase="setup", room=room)
        if self._closing or self._ctx is None:
            raise TransferError("decode service is not running", phase="setup", reason="shutdown", room=room)
        dst = as_block_array(dst_block_ids, self.num_blocks, side="decode", room=room, what="destination")
        if self.config.transport == "fake" or bootstrap_host == self.config.fake_bootstrap_host:
            self.metrics.room_done(0, 0.0)
            return AuxData(room=room, first_token_id=0)
        if not bootstrap_host or not isinstance(bootstrap_port, int) or not 0 < bootstrap_port < 65536:
            raise RoomError(
                f"bad bootstrap address {bootstrap_host!r}:{bootstrap_port!r}", phase="setup", room=room
            )
        try:
            register = Register(
                room=room,
                decode_inc=self.incarnation,
                decode_addr=self.addr,
                layout=self.layout.to_dict(),
                transport=self.config.transport,
                dst_blocks=dst.tolist(),
                endpoint=self.backend.endpoint(),
                checksum=self.config.checksum,
            )
        except ValidationError as exc:  # e.g. an over-long advertised address
            raise RoomError(f"cannot build the registration: {exc}", phase="setup", room=room) from exc
        peer = self._peer(bootstrap_host, bootstrap_port)
        rroom = RecvRoom(room, peer.key, dst, self.handle.loop, self.metrics.on_state)
        self.rooms[room] = rroom
        self.metrics.pages(dst.size)
        if not peer.rooms:
            peer.last_heard = time.monotonic()  # idle time before this room is not silence
        peer.rooms.add(room)
        self.backend.expect(room, self.incarnation, dst, peer.key)
        self.send(peer, register)
        rroom.registered = True
        self.arm(rroom)
        try:
            return await asyncio.shield(rroom.future)
        except asyncio.CancelledError:
            self.fail(rroom, TransferAbortedError("receive() cancelled", phase=rroom.state.phase, room=room))
            await wait_until(rroom.future.done, self.config.abort_timeout_s + 1.0)
            raise

    def abort(self, room: int, reason: str = "aborted by the decode worker") -> None:
        """Abort ``room`` from any thread; the awaiting ``receive`` raises TransferAbortedError."""

        def _do() -> None:
            rroom = self.rooms.get(room)
            if rroom is not None:
                self.fail(rroom, TransferAbortedError(reason, phase=rroom.state.phase, room=room))

        self.handle.call(_do)

    def poll(self, room: int) -> KVPoll | None:
        rroom = self.rooms.get(room)
        return None if rroom is None else rroom.state.value

    # -- peers ----------------------------------------------------------------------------------

    def _peer(self, host: str, port: int) -> PrefillPeer:
        key = f"{host}:{port}"
        peer = self.peers.get(key)
        if peer is not None:
            return peer
        if self._ctx is None:  # pragma: no cover - checked by receive()
            raise TransferError("decode service is not running", phase="setup", reason="shutdown")
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.incarnation.encode())
        sock.setsockopt(zmq.LINGER, 0)
        url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        try:
            sock.connect(url)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise HandshakeError(
                f"cannot connect to bootstrap endpoint {url}: {exc}", phase="bootstrap"
            ) from exc
        peer = PrefillPeer(key=key, sock=sock, last_heard=time.monotonic())
        self.peers[key] = peer
        task = self.handle.loop.create_task(self.peer_loop(peer))
        peer.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return peer

    # -- RecvSink (called from the receive thread) ---------------------------------------------

    def data_started(self, room: int) -> None:
        self.handle.call(self._started_by_id, room)

    def data_done(self, room: int, done: Done) -> None:
        self.handle.call(self._done_by_id, room, done)

    def data_failed(self, room: int, error: TransferError) -> None:
        self.handle.call(self._failed_by_id, room, error)

    def garbage(self, what: str) -> None:
        self.metrics.protocol_error()
        logger.warning("decode data endpoint dropped input: %s", what)

    def _started_by_id(self, room: int) -> None:
        rroom = self.rooms.get(room)
        if rroom is not None:
            self.started(rroom)

    def _done_by_id(self, room: int, done: Done) -> None:
        rroom = self.rooms.get(room)
        if rroom is not None:
            self.on_done(rroom, done)

    def _failed_by_id(self, room: int, error: TransferError) -> None:
        rroom = self.rooms.get(room)
        if rroom is not None:
            self.fail(rroom, error)

    def protocol_error(self, error: ProtocolError) -> None:
        self.metrics.protocol_error()
        logger.warning("decode control channel dropped a message: %s", error.message)


__all__ = ["DecodeTransferService"]
