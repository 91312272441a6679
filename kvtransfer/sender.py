"""``KVSender``: the prefill side of one room, handed to the prefill worker.

Lifecycle of a room on the prefill side (``PrefillTransferService.create_sender(room)``):

1. ``Bootstrapping``: waiting for the decode's ``register`` (it may also have arrived first and
   been parked; then the room starts at step 2). ``await sender.wait_ready()`` returns once the
   destination is known — the prefill worker admits the request to its engine only then
   (decode-first: decode memory throttles prefill).
2. ``WaitingForInput``: ``set_source(block_ids)`` names the prefill's pages (may grow, as a
   prefix-preserving extension). With layer-wise streaming the model runner's hook calls
   ``on_layer_done(layer, num_pages=None)`` after layer ``layer``'s K/V are written: pages
   ``[0, num_pages)`` (all when None) of that layer are final and are queued at once.
3. ``Transferring``: the data thread moves the queued rectangles of pages;
   ``await sender.finish(aux)`` queues whatever is left plus the ``done`` (aux data) and
   returns a :class:`TransferResult` once the decode *confirmed* the pages (counts, and
   checksums when enabled).
4. ``Success`` or ``Failed``: when ``finish`` returns or raises, kvtransfer no longer reads the
   source pages, so the worker can release them. ``abort(reason)`` works from any thread at any
   point and tells the decode, which frees its pages too.

``set_source``, ``on_layer_done``, ``abort`` and ``poll`` are thread-safe (the engine thread
calls them); ``wait_ready`` and ``finish`` are coroutines on the service's event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pdserve.kvtransfer.errors import RoomError, TransferAbortedError, TransferError, TransferTimeoutError
from pdserve.kvtransfer.pages import as_block_array
from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.states import KVPoll, RoomState, StateListener
from pdserve.kvtransfer.transports.base import DecodePeer

if TYPE_CHECKING:
    from pdserve.kvtransfer.prefill import PrefillTransferService

_ALL = np.iinfo(np.int64).max


@dataclass(frozen=True)
class TransferResult:
    room: int
    nbytes: int
    seconds: float  # first page moved -> decode confirmed
    transport: str


def quiet(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (nobody may be waiting on it)."""
    if not fut.cancelled():
        fut.exception()


class SendRoom:
    """Service-internal state of one prefill-side room. ``lock`` guards the page bookkeeping
    shared with the engine thread; ``busy`` is held by the data thread while it touches pages."""

    def __init__(
        self, room: int, num_layers: int, loop: asyncio.AbstractEventLoop, listener: StateListener
    ) -> None:
        self.room = room
        self.state = RoomState(listener)
        self.lock = threading.Lock()
        self.busy = threading.Lock()
        self.cancel = threading.Event()
        self.src: np.ndarray | None = None
        self.peer: DecodePeer | None = None
        self.dst: np.ndarray | None = None
        self.checksum = False
        self.ready = np.zeros(num_layers, dtype=np.int64)
        self.queued = np.zeros(num_layers, dtype=np.int64)
        self.events: dict[int, Any] = {}
        self.aux: AuxData | None = None
        self.done_queued = False
        self.started = False
        self.t_first: float | None = None
        self.nbytes = 0
        self.pages_counted = 0
        self.released = False
        self.fake = False
        self.timer: asyncio.TimerHandle | None = None
        self.registered: asyncio.Future[None] = loop.create_future()
        self.result: asyncio.Future[TransferResult] = loop.create_future()
        self.registered.add_done_callback(quiet)
        self.result.add_done_callback(quiet)

    def take_jobs(self) -> tuple[list[tuple[int, int, int, int]], bool]:
        """Under ``lock``: the new ``(layer_lo, layer_hi, pos_lo, pos_hi)`` rectangles that became
        ready since the last call, and whether the ``done`` should now be queued after them."""
        if self.src is None or self.dst is None or self.cancel.is_set():
            return [], False
        n = self.src.size
        target = np.minimum(self.ready, n)
        rects: list[tuple[int, int, int, int]] = []
        layers = target.size
        layer = 0
        while layer < layers:
            lo, hi = int(self.queued[layer]), int(target[layer])
            if hi <= lo:
                layer += 1
                continue
            end = layer + 1
            while end < layers and int(self.queued[end]) == lo and int(target[end]) == hi:
                end += 1
            rects.append((layer, end, lo, hi))
            self.queued[layer:end] = hi
            layer = end
        done = self.aux is not None and not self.done_queued and bool((self.queued >= n).all())
        if done:
            self.done_queued = True
        return rects, done


class KVSender:
    """The prefill worker's handle on one room (see the module docstring for the lifecycle)."""

    def __init__(self, service: PrefillTransferService, room: SendRoom) -> None:
        self._service = service
        self._room = room

    @property
    def room(self) -> int:
        return self._room.room

    def poll(self) -> KVPoll:
        return self._room.state.value

    @property
    def error(self) -> TransferError | None:
        return self._room.state.error

    async def wait_ready(self, within_s: float | None = None) -> None:
        """Return once the decode registered its pages (raises the room's TransferError)."""
        fut = asyncio.shield(self._room.registered)
        if within_s is None:
            await fut
            return
        try:
            await asyncio.wait_for(fut, within_s)
        except TimeoutError:
            # the room's own bootstrap timer fails it; this only bounds the caller's wait
            raise TransferTimeoutError(
                f"decode did not register within {within_s} s",
                side="prefill",
                phase="bootstrap",
                room=self.room,
            ) from None

    def set_source(self, block_ids: Sequence[int] | np.ndarray) -> None:
        """Name the source pages in token order (thread-safe; may extend an earlier list)."""
        svc, room = self._service, self._room
        try:
            arr = as_block_array(
                block_ids, svc.store.num_blocks, side="prefill", room=room.room, what="source"
            )
            with room.lock:
                if room.src is not None and (
                    arr.size < room.src.size or not np.array_equal(arr[: room.src.size], room.src)
                ):
                    raise RoomError(
                        "set_source may only extend the earlier page list",
                        side="prefill",
                        phase=room.state.phase,
                        room=room.room,
                    )
                if room.dst is not None and arr.size > room.dst.size:
                    raise RoomError(
                        f"{arr.size} source pages but the decode reserved {room.dst.size}",
                        side="prefill",
                        phase=room.state.phase,
                        room=room.room,
                    )
                grow = arr.size - (0 if room.src is None else room.src.size)
                room.src = arr
                if not room.released:
                    room.pages_counted += grow
                    svc.metrics.pages(grow)
                svc.schedule_locked(room)
        except TransferError as exc:
            svc.fail_threadsafe(room, exc)
            raise

    def on_layer_done(self, layer_idx: int, num_pages: int | None = None) -> None:
        """Layer ``layer_idx``'s pages ``[0, num_pages)`` (all if None) are final (thread-safe)."""
        svc, room = self._service, self._room
        if not 0 <= layer_idx < room.ready.size:
            raise RoomError(
                f"layer {layer_idx} outside [0, {room.ready.size})", side="prefill", room=room.room
            )
        event = svc.capture_ready_event()
        with room.lock:
            if event is not None:
                room.events[layer_idx] = event
            room.ready[layer_idx] = max(int(room.ready[layer_idx]), _ALL if num_pages is None else num_pages)
            svc.schedule_locked(room)

    async def finish(self, aux: AuxData) -> TransferResult:
        """Ship everything not yet shipped plus ``aux``; return when the decode confirmed."""
        svc, room = self._service, self._room
        if room.state.value == KVPoll.Failed:
            pass  # already failed: the awaited result raises the room's own error
        elif aux.room != room.room:
            err = RoomError(
                f"aux data names room {aux.room}", side="prefill", phase=room.state.phase, room=room.room
            )
            svc.fail_threadsafe(room, err)
            raise err
        elif room.fake:
            svc.finish_fake(room)
        else:
            with room.lock:
                if room.src is None:
                    err = RoomError(
                        "finish() before set_source()", side="prefill", phase=room.state.phase, room=room.room
                    )
                    svc.fail_threadsafe(room, err)
                    raise err
                room.aux = aux
                room.ready[:] = _ALL
                svc.schedule_locked(room)
        try:
            return await asyncio.shield(room.result)
        except asyncio.CancelledError:
            svc.fail_threadsafe(
                room,
                TransferAbortedError(
                    "finish() cancelled", side="prefill", phase=room.state.phase, room=room.room
                ),
            )
            await svc.wait_settled(room)
            raise

    def abort(self, reason: str = "aborted by the prefill worker") -> None:
        self._service.abort(self.room, reason)
