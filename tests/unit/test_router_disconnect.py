"""DisconnectWatch: cancels the watched task on http.disconnect, cleans up on stop, falls back to a Task."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdserve.router.disconnect import DisconnectWatch

pytestmark = pytest.mark.unit


class Server:
    """A uvicorn-like receive(): waits on an Event, then reports a disconnect."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.event.wait()
        return {"type": "http.disconnect"}


async def test_disconnect_cancels_the_task() -> None:
    srv = Server()

    async def handler() -> str:
        watch = DisconnectWatch(srv.receive)
        try:
            await asyncio.sleep(10)
            return "finished"
        except asyncio.CancelledError:
            assert watch.fired
            return "cancelled by disconnect"
        finally:
            watch.stop()

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    srv.event.set()
    assert await asyncio.wait_for(task, 1.0) == "cancelled by disconnect"


async def test_stop_detaches_and_removes_the_waiter() -> None:
    srv = Server()
    watch = DisconnectWatch(srv.receive)
    assert len(srv.event._waiters) == 1  # type: ignore[attr-defined]
    watch.stop()
    assert len(srv.event._waiters) == 0  # type: ignore[attr-defined]
    srv.event.set()
    await asyncio.sleep(0.01)
    assert not watch.fired
    watch.stop()  # idempotent


async def test_already_disconnected_fires_at_once() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def handler() -> bool:
        watch = DisconnectWatch(receive)
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return watch.fired
        return False

    assert await asyncio.wait_for(asyncio.create_task(handler()), 1.0)


async def test_stray_body_message_keeps_watching() -> None:
    msgs = [{"type": "http.request", "body": b"", "more_body": False}]
    srv = Server()

    async def receive() -> dict[str, Any]:
        if msgs:
            return msgs.pop()
        return await srv.receive()

    async def handler() -> bool:
        watch = DisconnectWatch(receive)
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return watch.fired
        return False

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    assert not task.done()
    srv.event.set()
    assert await asyncio.wait_for(task, 1.0)


async def test_non_coroutine_receive_uses_a_task() -> None:
    srv = Server()

    def receive() -> Any:
        return asyncio.ensure_future(srv.receive())

    async def handler() -> bool:
        watch = DisconnectWatch(receive)
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return watch.fired
        return False

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    srv.event.set()
    assert await asyncio.wait_for(task, 1.0)
