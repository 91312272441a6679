"""``PrefillTransferService``: the prefill worker's bootstrap endpoint and KV sender.

Lifecycle:

1. ``PrefillTransferService(config, layout, kv_storage, registry=..., host, port)`` checks the
   storage against the layout and picks the send backend named by ``config.transport``;
2. ``await start()`` binds the bootstrap endpoint (a zmq ROUTER on ``host:port``; port 0 picks
   one: ``bootstrap_port``), starts the data thread and the heartbeat/timeout ticker, and logs
   ``describe()`` (the transport in use is explicit, never a silent fallback);
3. per request ``create_sender(room)`` -> :class:`KVSender`; decode ``register`` messages that
   arrive first are parked (bootstrap timeout) and picked up by ``create_sender``; see
   :mod:`pdserve.kvtransfer.sender` for the per-room steps;
4. control messages (:mod:`pdserve.kvtransfer.bootstrap`): ``register`` -> layout/transport
   check -> ``ack`` or ``failed``; ``ping`` -> ``pong``; ``confirm`` -> Success; ``abort`` ->
   stop touching the room, then ``abort_ack``; a decode silent for ``heartbeat_interval_s *
   heartbeat_misses`` or replaced by a new incarnation at the same address fails its rooms;
5. ``await close()`` fails every open room (reason ``shutdown``, the decode is told), stops the
   data thread, closes sockets and unmaps peers' segments.

Every failure path funnels through :meth:`fail`: state -> Failed, cancel flag for the data
thread, wait (bounded) until the data thread is out of the room, tell the decode, resolve the
worker's awaitables, release the room's page count.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from pdserve.engine.kv_layout import KVLayout
from pdserve.kvtransfer.bootstrap import BootstrapEndpoint
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.errors import (
    RoomError,
    TransferAbortedError,
    TransferError,
    TransferTimeoutError,
    TransportError,
)
from pdserve.kvtransfer.metrics import TransferMetrics
from pdserve.kvtransfer.pages import PageStore
from pdserve.kvtransfer.protocol import MAX_ROOM, Done, NcclPlan
from pdserve.kvtransfer.runtime import DataThread, LoopHandle, fail_all_rooms, state_counts, wait_until
from pdserve.kvtransfer.sender import KVSender, SendRoom, TransferResult
from pdserve.kvtransfer.states import KVPoll
from pdserve.kvtransfer.transports import make_send_backend
from pdserve.kvtransfer.transports.base import DecodePeer, SendJob

logger = logging.getLogger(__name__)


class PrefillTransferService:
    def __init__(
        self,
        config: TransferConfig,
        layout: KVLayout,
        kv_storage: torch.Tensor,
        *,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        nccl_lib: Any = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.store = PageStore(layout, kv_storage)
        self.incarnation = uuid.uuid4().hex
        self.host = host
        self.registry = registry
        self.metrics = TransferMetrics(registry, side="prefill", transport=config.transport)
        self.backend = make_send_backend(config, self.store, self._post_plan, nccl_lib=nccl_lib)
        self.rooms: dict[int, SendRoom] = {}
        self.handle = LoopHandle()
        self.data = DataThread("kv-send")
        self.endpoint = BootstrapEndpoint(self, host=host, port=port)
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def bootstrap_port(self) -> int:
        return self.endpoint.port

    async def start(self) -> None:
        self.handle.bind()
        self.data.start()
        try:
            await self.endpoint.start()
        except BaseException:
            self.data.stop(5.0)
            raise
        logger.info("kvtransfer prefill service up: %s", self.describe())

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        within = self.config.abort_timeout_s + 1.0
        await fail_all_rooms(self.rooms, self.fail, side="prefill", within_s=within)
        await self.endpoint.close()
        self.data.submit(self.backend.close)
        self.data.stop(10.0)
        logger.info("kvtransfer prefill service closed")

    def describe(self) -> dict[str, Any]:
        return {
            "side": "prefill",
            "transport": self.config.transport,
            "incarnation": self.incarnation,
            "bootstrap": f"tcp://{self.host}:{self.endpoint.port}",
            "layout": self.layout.to_dict(),
            "checksum": self.config.checksum,
            "layer_streaming": True,
            "rooms": state_counts(self.rooms.values()),
            "pending_registrations": len(self.endpoint.pending),
            "pages_held": self.pages_held(),
            "decode_peers": len(self.endpoint.decodes),
            "backend": self.backend.describe(),
        }

    def pages_held(self) -> int:
        return sum(room.pages_counted for room in self.rooms.values())

    # -- worker API -----------------------------------------------------------------------------

    def create_sender(self, room: int, *, bootstrap_host: str | None = None) -> KVSender:
        """Open ``room`` (event-loop thread). A fake bootstrap host or transport completes at once."""
        if not isinstance(room, int) or not 0 <= room <= MAX_ROOM:
            raise RoomError(
                f"bootstrap_room must be an int in [0, 2^63), got {room!r}", side="prefill", phase="setup"
            )
        if room in self.rooms:
            raise RoomError("room already open on this prefill", side="prefill", phase="setup", room=room)
        if self._closing:
            raise TransferError(
                "prefill service is closed", side="prefill", phase="setup", reason="shutdown", room=room
            )
        sroom = SendRoom(room, self.layout.num_layers, self.handle.loop, self.metrics.on_state)
        self.rooms[room] = sroom
        sender = KVSender(self, sroom)
        if self.config.transport == "fake" or bootstrap_host == self.config.fake_bootstrap_host:
            sroom.fake = True
            sroom.state.advance(KVPoll.WaitingForInput)
            sroom.registered.set_result(None)
            return sender
        self.arm(sroom)
        self.endpoint.adopt_pending(sroom)
        return sender

    def abort(self, room: int, reason: str = "aborted by the prefill worker") -> None:
        """Abort ``room`` from any thread; the decode is told and frees its pages."""

        def _do() -> None:
            sroom = self.rooms.get(room)
            if sroom is not None:
                self.fail(
                    sroom, TransferAbortedError(reason, side="prefill", phase=sroom.state.phase, room=room)
                )
            else:
                self.endpoint.reject_pending(
                    room, TransferAbortedError(reason, side="prefill", phase="bootstrap", room=room)
                )

        self.handle.call(_do)

    def poll(self, room: int) -> KVPoll | None:
        sroom = self.rooms.get(room)
        return None if sroom is None else sroom.state.value

    # -- room state (event-loop thread) ---------------------------------------------------------

    def arm(self, room: SendRoom) -> None:
        """(Re)start the timeout of the room's current phase."""
        if room.timer is not None:
            room.timer.cancel()
        phase = room.state.phase
        room.timer = self.handle.loop.call_later(self.config.timeout_for(phase), self._expire, room, phase)

    def _expire(self, room: SendRoom, phase: str) -> None:
        if room.state.value.terminal or room.state.phase != phase:
            return
        what = {
            "bootstrap": "no decode registered",
            "waiting": "the prefill never finished",
            "transfer": "the decode never confirmed",
        }.get(phase, "phase timed out")
        self.fail(
            room,
            TransferTimeoutError(
                f"{what} within {self.config.timeout_for(phase)} s",
                side="prefill",
                phase=phase,
                room=room.room,
            ),
        )

    def attach(self, room: SendRoom) -> None:
        """The room's registration is known (called by the endpoint)."""
        room.state.advance(KVPoll.WaitingForInput)
        self.arm(room)
        if not room.registered.done():
            room.registered.set_result(None)
        with room.lock:
            if room.src is not None and room.dst is not None and room.src.size > room.dst.size:
                err = RoomError(
                    f"{room.src.size} source pages but the decode reserved {room.dst.size}",
                    side="prefill",
                    phase="waiting",
                    room=room.room,
                )
                self.handle.loop.call_soon(self.fail, room, err)
                return
            self.schedule_locked(room)

    def fail(self, room: SendRoom, error: TransferError, reply: str = "failed") -> None:
        """Fail ``room`` (loop thread). ``reply``: ``failed`` tells the decode, ``abort_ack``
        answers its abort, ``none`` sends nothing (the peer is known to be gone)."""
        if not room.state.fail(error):
            if reply == "abort_ack" and room.peer is not None:
                self.endpoint.send_abort_ack(room.peer.identity, room.room)
            return
        room.cancel.set()
        if room.timer is not None:
            room.timer.cancel()
        self.metrics.room_failed(error.phase, error.reason)
        log = logger.info if error.reason in ("aborted", "shutdown") else logger.warning
        log("prefill room %d failed: %s", room.room, error)
        task = self.handle.loop.create_task(self._settle_failed(room, error, reply))
        self.endpoint.tasks.add(task)
        task.add_done_callback(self.endpoint.tasks.discard)

    def fail_threadsafe(self, room: SendRoom, error: TransferError) -> None:
        self.handle.call(self.fail, room, error)

    async def _settle_failed(self, room: SendRoom, error: TransferError, reply: str) -> None:
        if not await wait_until(lambda: not room.busy.locked(), self.config.abort_timeout_s):
            logger.error(
                "room %d: data thread still busy %.1f s after failure", room.room, self.config.abort_timeout_s
            )
        if room.peer is not None:
            if reply == "failed":
                self.endpoint.send_failed(room.peer.identity, room.room, error)
            elif reply == "abort_ack":
                self.endpoint.send_abort_ack(room.peer.identity, room.room)
        for fut in (room.registered, room.result):
            if not fut.done():
                fut.set_exception(error)
        self._release(room)

    def succeed(self, room: SendRoom) -> None:
        if not room.state.advance(KVPoll.Success):
            return
        if room.timer is not None:
            room.timer.cancel()
        seconds = time.monotonic() - (room.t_first or time.monotonic())
        self.metrics.room_done(room.nbytes, seconds)
        room.result.set_result(TransferResult(room.room, room.nbytes, seconds, self.config.transport))
        self._release(room)

    def finish_fake(self, room: SendRoom) -> None:
        room.t_first = time.monotonic()
        self.handle.call(self.succeed, room)

    async def wait_settled(self, room: SendRoom) -> None:
        await wait_until(lambda: room.room not in self.rooms, self.config.abort_timeout_s + 1.0)

    def _release(self, room: SendRoom) -> None:
        if self.rooms.get(room.room) is room:
            del self.rooms[room.room]
        with room.lock:  # set_source may run concurrently on the engine thread
            room.released = True
            counted, room.pages_counted = room.pages_counted, 0
        self.metrics.pages(-counted)
        if room.peer is not None:
            self.endpoint.room_gone(room)

    # -- data thread ----------------------------------------------------------------------------

    def schedule_locked(self, room: SendRoom) -> None:
        """Under ``room.lock``: queue newly ready page rectangles (and the done) in order."""
        rects, done = room.take_jobs()
        for rect in rects:
            self.data.submit(functools.partial(self._run_pages, room, rect))
        if done:
            self.data.submit(functools.partial(self._run_done, room))

    def capture_ready_event(self) -> Any:
        return self.backend.capture_ready_event()

    def prepare(self, peer: DecodePeer) -> None:
        """Connect to a new decode off the critical path (its first room's pages retry and
        report any error)."""

        def job() -> None:
            try:
                self.backend.connect(peer)
            except TransferError as exc:
                logger.debug("early connect to decode %s failed: %s", peer.decode_addr, exc)

        self.data.submit(job)

    @contextlib.contextmanager
    def _failing(self, room: SendRoom, what: str) -> Iterator[None]:
        """Data-thread jobs: an error fails ``room`` (a foreign one as a :class:`TransportError`)."""
        try:
            yield
        except TransferError as exc:
            self.fail_threadsafe(room, exc)
        except Exception as exc:
            logger.exception("room %d: %s failed", room.room, what)
            error = TransportError(f"{what} failed: {exc!r}", side="prefill", room=room.room)
            self.fail_threadsafe(room, error)

    def _run_pages(self, room: SendRoom, rect: tuple[int, int, int, int]) -> None:
        with room.busy:
            if room.cancel.is_set() or room.peer is None or room.src is None or room.dst is None:
                return
            with self._failing(room, "send"):
                self.backend.connect(room.peer)
                if not room.started:
                    room.started = True
                    room.t_first = time.monotonic()
                    self.handle.call(self.endpoint.on_begin, room)
                lo, hi, plo, phi = rect
                job = SendJob(
                    room=room.room,
                    decode_inc=room.peer.decode_inc,
                    src=room.src,
                    dst=room.dst,
                    layer_lo=lo,
                    layer_hi=hi,
                    pos_lo=plo,
                    pos_hi=phi,
                    cancel=room.cancel,
                    deadline=time.monotonic() + self.config.transfer_timeout_s,
                    ready=room.events.get(hi - 1),
                )
                room.nbytes += self.backend.send_pages(job)

    def _run_done(self, room: SendRoom) -> None:
        with room.busy:
            if room.cancel.is_set() or room.peer is None or room.src is None or room.aux is None:
                return
            with self._failing(room, "done"):
                checksums = self.store.layer_checksums(room.src) if room.checksum else None
                done = Done(
                    room=room.room,
                    prefill_inc=self.incarnation,
                    aux=room.aux,
                    num_pages=int(room.src.size),
                    nbytes=room.nbytes,
                    checksums=checksums,
                )
                deadline = time.monotonic() + self.config.transfer_timeout_s
                delivered = self.backend.send_done(room.peer.decode_inc, done, deadline)
                self.handle.call(self.endpoint.on_done_sent, room, done, delivered)

    def _post_plan(
        self, decode_inc: str, room: int, layers: tuple[int, int], groups: list[tuple[int, int]]
    ) -> None:
        plan = NcclPlan(room=room, prefill_inc=self.incarnation, layers=layers, groups=groups)
        self.handle.call(self.endpoint.send_plan, decode_inc, plan)

    def disconnect_later(self, decode_inc: str) -> None:
        if not self._closing:
            self.data.submit(functools.partial(self.backend.disconnect, decode_inc))


__all__ = ["KVSender", "PrefillTransferService", "TransferResult"]
