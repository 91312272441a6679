"""``CancelWatch``: notice a request's cancellation while the worker waits on something else.

Starlette only notices a client disconnect while it streams a response; a worker spends much of
a PD request *before* that (waiting for the decode's registration, computing the prompt, waiting
for KV pages), and a non-streaming request never streams. So each request gets one watcher:

1. ``async with CancelWatch(ctx, poll_s):`` starts a task that wakes on ``ctx.cancel()`` at once
   (``/abort_request``, the serving layer giving up) and polls ``ctx.is_cancelled()`` (client
   disconnect) every ``poll_s`` seconds;
2. ``await watch.run(aw, timeout_s, what)`` awaits ``aw`` but stops it (cancels its task) when
   the request is cancelled (-> :class:`AbortedError`) or ``timeout_s`` passes
   (-> :class:`RequestTimeoutError`); the cancelled task gets ``settle_s`` to run its cleanup;
3. ``watch.on_cancel(fn)`` registers a callback run once on cancellation (e.g. abort the engine
   request while its token stream is being consumed);
4. leaving the ``async with`` stops the watcher task.

:func:`closing` is ``contextlib.aclosing`` for streams typed as plain ``AsyncIterator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from pdserve.api.backend import RequestContext
from pdserve.errors import AbortedError, RequestTimeoutError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CancelWatch:
    def __init__(self, ctx: RequestContext, poll_s: float, *, settle_s: float = 5.0) -> None:
        self.ctx = ctx
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.cancelled = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CancelWatch:
        self._task = asyncio.create_task(self._watch(), name=f"cancel-watch-{self.ctx.request_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        self._callbacks.clear()

    @property
    def reason(self) -> str:
        return self.ctx.cancel_reason or "cancelled"

    def on_cancel(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` when the request is cancelled (now, if it already is)."""
        if self.cancelled.is_set():
            self._safe(fn)
        else:
            self._callbacks.append(fn)

    def check(self) -> None:
        if self.cancelled.is_set() or self.ctx.cancelled:
            raise AbortedError(f"request {self.ctx.request_id} was cancelled: {self.reason}")

    async def run(self, aw: Awaitable[T], timeout_s: float, what: str) -> T:
        """``await aw``, unless the request is cancelled or ``timeout_s`` seconds pass first."""
        self.check()
        left = self.ctx.time_left()
        if left is not None and left < timeout_s:  # the request's own deadline comes first
            timeout_s = max(left, 0.0)
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.cancelled.wait())
        both: set[asyncio.Future[Any]] = {task, stop}
        try:
            done, _ = await asyncio.wait(both, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self._stop(task)
            raise
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        await self._stop(task)
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()  # finished while we were stopping it
        if self.cancelled.is_set():
            raise AbortedError(f"request {self.ctx.request_id} was cancelled while {what}: {self.reason}")
        raise RequestTimeoutError(f"request {self.ctx.request_id}: {what} took longer than {timeout_s:.1f} s")

    async def _stop(self, task: asyncio.Future[T]) -> None:
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: we are raising our own error
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=self.settle_s)
        if not done:
            logger.error("request %s: a cancelled wait did not settle in %.1f s", self.ctx.request_id,
                         self.settle_s)  # fmt: skip
        elif not task.cancelled():
            task.exception()

    async def _watch(self) -> None:
        ctx = self.ctx
        while True:
            if await ctx.wait_cancelled(self.poll_s):
                break
            try:
                if await ctx.is_cancelled():
                    break
            except Exception:  # a broken disconnect probe must not kill the request
                logger.debug("request %s: disconnect check failed", ctx.request_id, exc_info=True)
        self.cancelled.set()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._safe(fn)

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            logger.exception("request %s: cancel callback failed", self.ctx.request_id)


@contextlib.asynccontextmanager
async def closing(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """``async with closing(stream):`` closes an async generator on the way out (the typed
    ``AsyncIterator`` of an engine stream does not promise ``aclose``)."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
