"""Client-disconnect detection for raw ASGI handlers, without a Task per request.

After a request body has been read, the ASGI server's ``receive()`` only returns when the client
disconnects. A handler that must abort its upstream work on disconnect usually awaits that in a
second Task; on the router's hot path that Task costs ~25 µs of CPU per request. ``DisconnectWatch``
instead drives the ``receive()`` coroutine by hand:

1. ``__init__`` steps it once, to its first suspension (the server waiting on an asyncio future).
2. A done-callback on that future steps it again; when it finishes with ``http.disconnect`` the
   watched task is cancelled (``fired`` tells the handler why it was cancelled).
3. ``stop()`` (the response is complete or the handler is leaving) detaches the callback and
   closes the coroutine, so the server's waiter is removed cleanly.

A coroutine that suspends on anything but an asyncio future (not the case for uvicorn) falls back to
the plain Task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, MutableMapping
from typing import Any

from pdserve.api.asgi import Receive


class DisconnectWatch:
    __slots__ = ("_coro", "_fut", "_receive", "_task", "active", "fired", "task")

    def __init__(self, receive: Receive) -> None:
        self.task = asyncio.current_task()
        self.active = True
        self.fired = False
        self._receive = receive
        self._fut: asyncio.Future[Any] | None = None
        self._task: asyncio.Future[Any] | None = None
        self._coro: Coroutine[Any, Any, Any] | None = None
        self._arm()

    def _arm(self) -> None:
        aw = self._receive()
        if not asyncio.iscoroutine(aw):
            self._task = asyncio.ensure_future(aw)
            self._task.add_done_callback(self._task_done)
            return
        self._coro = aw
        self._step(None)

    def _step(self, _fut: Any) -> None:
        coro = self._coro
        if coro is None or not self.active:
            return
        self._fut = None
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            self._coro = None
            self._message(stop.value)
            return
        except BaseException:  # the server's receive failed: treat as a disconnect
            self._coro = None
            self._fire()
            return
        if asyncio.isfuture(yielded):
            yielded._asyncio_future_blocking = False  # what a Task does with an awaited future
            self._fut = yielded
            yielded.add_done_callback(self._step)
        elif yielded is None:  # a bare yield (sleep(0)): step again on the next loop pass
            asyncio.get_running_loop().call_soon(self._step, None)
        else:  # unknown suspension protocol: hand over to a Task
            coro.close()
            self._coro = None
            self._task = asyncio.ensure_future(self._receive())
            self._task.add_done_callback(self._task_done)

    def _task_done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._fire()
        else:
            self._message(fut.result())

    def _message(self, msg: Any) -> None:
        if isinstance(msg, MutableMapping) and msg.get("type") != "http.disconnect":
            if self.active:  # a stray body message: keep watching
                self._arm()
            return
        self._fire()

    def _fire(self) -> None:
        if self.active and self.task is not None and not self.task.done():
            self.fired = True
            self.task.cancel()

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        self.active = False
        fut, self._fut = self._fut, None
        if fut is not None:
            fut.remove_done_callback(self._step)
        coro, self._coro = self._coro, None
        if coro is not None:
            coro.close()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
