"""A backend's delta iterator with cheap bounded waits and guaranteed cleanup.

Lifecycle of one :class:`BackendStream` (one per request):

1. ``next(timeout_s)`` awaits the next delta. The bound is enforced by one loop timer per request
   (re-armed only when it fires early), not a timer per delta: a wait costs two attribute stores.
   When the bound (or the context's deadline) passes while a wait is pending, the waiting task is
   cancelled (again every ``close_timeout_s`` if the backend keeps awaiting in its cleanup) and
   the wait raises :class:`RequestTimeoutError` (408). A backend that stops without
   a ``finished`` delta raises :class:`WorkerError` (502).
2. ``close(done)`` always runs (``finally``): on an abnormal exit it cancels the context first, then
   closes the iterator (bounded by ``close_timeout_s``) so the backend's ``finally`` frees what it
   holds; the timer is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pdserve.api.backend import RequestContext
from pdserve.engine.outputs import RequestOutput
from pdserve.errors import RequestTimeoutError, WorkerError

logger = logging.getLogger(__name__)


class BackendStream:
    __slots__ = (
        "_expires",
        "_fired",
        "_handle",
        "_it",
        "_loop",
        "_task",
        "_timeout_s",
        "_waiting",
        "close_timeout_s",
        "ctx",
    )

    def __init__(
        self, it: AsyncIterator[RequestOutput], ctx: RequestContext, *, close_timeout_s: float
    ) -> None:
        self._it = it
        self.ctx = ctx
        self.close_timeout_s = close_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._expires = 0.0
        self._timeout_s = 0.0
        self._waiting = False
        self._fired = 0  # cancellations sent by the timer during the current wait

    async def next(self, timeout_s: float) -> RequestOutput:
        """The next delta within ``timeout_s`` seconds (and the context's deadline)."""
        left = self.ctx.time_left()
        if left is not None and left < timeout_s:
            timeout_s = max(left, 0.0)
        try:
            out: RequestOutput = await self._bounded(anext(self._it), timeout_s)
        except StopAsyncIteration:
            raise WorkerError("backend stream ended without a final output") from None
        return out

    async def _bounded(self, aw: Awaitable[Any], timeout_s: float) -> Any:
        """Await ``aw``; :class:`RequestTimeoutError` if it takes longer than ``timeout_s``."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        expires = loop.time() + timeout_s
        self._expires, self._timeout_s = expires, timeout_s
        task = self._task = asyncio.current_task()
        handle = self._handle
        if handle is None or handle.when() > expires:
            if handle is not None:
                handle.cancel()
            self._handle = loop.call_at(expires, self._on_timer)
        cancelling = task.cancelling() if task is not None else 0
        self._waiting = True
        try:
            out = await aw
        except BaseException:
            self._waiting = False
            if self._disarm(task, cancelling):
                raise RequestTimeoutError(f"no output from the backend within {timeout_s:.1f} s") from None
            raise
        self._waiting = False
        self._disarm(task, cancelling)  # the awaited code swallowed our cancellation
        return out

    def _disarm(self, task: asyncio.Task[Any] | None, cancelling: int) -> bool:
        """After a wait: take back the cancellations the timer sent. True when the timer was the
        only reason the task was cancelled (the wait timed out)."""
        fired, self._fired = self._fired, 0
        if not fired or task is None:
            return False
        remaining = task.cancelling()
        for _ in range(fired):
            remaining = task.uncancel()
        return remaining <= cancelling

    def _on_timer(self) -> None:
        self._handle = None
        loop, task = self._loop, self._task
        if not self._waiting or task is None or loop is None:
            return  # re-armed by the next wait
        now = loop.time()
        if now < self._expires:
            self._handle = loop.call_at(self._expires, self._on_timer)
            return
        self._fired += 1
        task.cancel()
        # Code that keeps awaiting while cancelled (cleanup in a ``finally``) is cancelled again
        # every ``close_timeout_s`` until the wait ends.
        self._expires = now + self.close_timeout_s
        self._handle = loop.call_at(self._expires, self._on_timer)

    async def close(self, done: bool) -> None:
        ctx = self.ctx
        if not done:
            ctx.cancel("request ended early")
        aclose: Callable[[], Awaitable[Any]] | None = getattr(self._it, "aclose", None)
        try:
            if aclose is not None:
                await self._bounded(aclose(), self.close_timeout_s)
        except RequestTimeoutError:
            logger.warning(
                "closing the backend stream of %s timed out after %.1f s",
                ctx.request_id,
                self.close_timeout_s,
            )
        except Exception:
            logger.exception("closing the backend stream of %s failed", ctx.request_id)
        finally:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
