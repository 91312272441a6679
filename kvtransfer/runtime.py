"""Threading helpers shared by both services: the data-movement thread and loop hand-offs.

Lifecycle of a :class:`DataThread`:

1. ``start()`` spawns one daemon thread that runs submitted callables in FIFO order (torch
   copies and zmq sends release the GIL, so bulk copies never block the event loop);
2. ``submit(fn)`` from any thread; an exception escaping ``fn`` is logged, never kills the thread;
3. ``stop(timeout)`` runs the queued callables, then ends the thread; returns whether it ended.

:class:`LoopHandle` remembers the service's event loop so thread-safe entry points
(``abort``, ``on_layer_done``, receive-thread callbacks) can hop onto it. :func:`fail_all_rooms`
and :func:`state_counts` are the room-table chores both services share (shutdown, ``describe``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from pdserve.kvtransfer.errors import TransferError
from pdserve.kvtransfer.states import RoomState

logger = logging.getLogger(__name__)

_STOP = object()


class _Room(Protocol):
    @property
    def room(self) -> int: ...

    @property
    def state(self) -> RoomState: ...


R = TypeVar("R", bound=_Room)


class DataThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def stop(self, timeout: float) -> bool:
        thread = self._thread
        if thread is None:
            return True
        self._queue.put(_STOP)
        thread.join(timeout)
        if thread.is_alive():
            logger.error("data thread %s did not stop within %.1f s", self.name, timeout)
            return False
        self._thread = None
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                item()
            except Exception:
                logger.exception("data thread %s: job failed", self.name)


class LoopHandle:
    """The event loop a service runs on, captured at ``start()``."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_id: int | None = None

    def bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        return self._loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise TransferError("the transfer service is not started (call start() first)", phase="setup")
        return self._loop

    @property
    def bound(self) -> bool:
        return self._loop is not None and not self._loop.is_closed()

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop: now if already there, else thread-safely soon."""
        if self.on_loop_thread():
            fn(*args)
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed between the check and the call
            logger.debug("event loop closed; dropped %r", fn)


async def wait_until(predicate: Callable[[], bool], within_s: float, step: float = 0.002) -> bool:
    """Poll ``predicate`` until true or ``within_s`` seconds passed; returns its last value."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        await asyncio.sleep(step)
    return True


def log_future_exception(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.warning("control send failed: %s", fut.exception())


def state_counts(rooms: Iterable[_Room]) -> dict[str, int]:
    """How many of ``rooms`` are in each :class:`KVPoll` state (by name)."""
    states: dict[str, int] = {}
    for room in rooms:
        states[room.state.value.name] = states.get(room.state.value.name, 0) + 1
    return states


async def fail_all_rooms(
    rooms: Mapping[int, R], fail: Callable[[R, TransferError], None], *, side: str, within_s: float
) -> bool:
    """Fail every open room with a ``shutdown`` error, then wait up to ``within_s`` seconds for
    ``rooms`` to empty (the failures release them); returns whether it did."""
    for room in list(rooms.values()):
        fail(
            room,
            TransferError(
                f"{side} service shutting down",
                side=side,
                phase=room.state.phase,
                reason="shutdown",
                room=room.room,
            ),
        )
    return await wait_until(lambda: not rooms, within_s)
