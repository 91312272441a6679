"""Room rendezvous for the fake worker, over the prefill worker's bootstrap port.

A model-free stand-in for SGLang's bootstrap + KV handshake with the same failure semantics:

1. The prefill worker listens on its bootstrap port (smg probes it over TCP; a plain HTTP request
   such as ``GET /health`` gets ``200 OK``).
2. Decode first: the decode leg connects and sends one JSON line ``{"room": R, "prompt_tokens":
   N}`` and waits (bounded) for one reply line.
3. The prefill leg for room R waits (bounded) for that registration, "computes" for the configured
   delay, then replies ``{"ok": true, "first_token": T, ...}`` (the aux data).
4. Either side failing is pushed to the other at once: the prefill leg aborting replies
   ``{"ok": false, "error": ...}``; the decode connection closing fails the prefill leg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from pdserve.errors import RequestTimeoutError, WorkerError

logger = logging.getLogger(__name__)


class RoomFailed(WorkerError):
    """The other leg of this room failed or went away."""


class _Room:
    __slots__ = ("decode_gone", "decode_ready", "done", "prefill_active", "writer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.decode_ready: asyncio.Future[None] = loop.create_future()
        self.decode_gone: asyncio.Future[None] = loop.create_future()
        self.writer: asyncio.StreamWriter | None = None
        self.done = False
        self.prefill_active = False


class BootstrapServer:
    """Prefill side: the TCP server on the bootstrap port and the per-room registry."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._rooms: dict[int, _Room] = {}
        self._server: asyncio.Server | None = None
        self.probes = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
        for room in self._rooms.values():
            if room.writer is not None:
                room.writer.close()
        self._rooms.clear()

    def _room(self, room_id: int) -> _Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = self._rooms[room_id] = _Room(asyncio.get_running_loop())
        return room

    @property
    def open_rooms(self) -> int:
        return len(self._rooms)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        room_id: int | None = None
        try:
            line = await asyncio.wait_for(reader.readline(), 30.0)
            if not line:  # a bare TCP probe
                self.probes += 1
                return
            if not line.lstrip().startswith(b"{"):  # an HTTP probe (GET /health ...)
                self.probes += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK")
                await writer.drain()
                return
            msg = orjson.loads(line)
            room_id = int(msg["room"])
            room = self._room(room_id)
            room.writer = writer
            if not room.decode_ready.done():
                room.decode_ready.set_result(None)
            await reader.read()  # until the decode side closes (after its reply, or on abort)
        except (OSError, ValueError, KeyError, TimeoutError) as exc:
            logger.debug("bootstrap connection error: %s", exc)
        finally:
            entry = self._rooms.get(room_id) if room_id is not None else None
            if entry is not None and entry.writer is writer:
                if not entry.done and not entry.decode_gone.done():
                    entry.decode_gone.set_result(None)
                if entry.done or not entry.prefill_active:
                    self._rooms.pop(room_id if room_id is not None else -1, None)
            writer.close()

    async def prefill(self, room_id: int, delay_s: float, timeout_s: float, aux: dict[str, Any]) -> None:
        """Run the prefill side of one room: wait for decode, compute, send the aux data.

        Raises RoomFailed if the decode side went away, RequestTimeoutError if it never came.
        Cancellation (the client of this leg disconnected) fails the room for the decode side."""
        room = self._room(room_id)
        room.prefill_active = True
        sent = False
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    await room.decode_ready
            except TimeoutError:
                raise RequestTimeoutError(
                    f"room {room_id}: no decode registration in {timeout_s:g}s"
                ) from None
            if room.decode_gone.done():
                raise RoomFailed(f"room {room_id}: the decode side went away")
            sleeper = asyncio.ensure_future(asyncio.sleep(delay_s))
            done, _ = await asyncio.wait({sleeper, room.decode_gone}, return_when=asyncio.FIRST_COMPLETED)
            if room.decode_gone in done:
                sleeper.cancel()
                raise RoomFailed(f"room {room_id}: the decode side went away during prefill")
            self._reply(room, {"ok": True, **aux})
            sent = True
        finally:
            if not sent:
                self._reply(room, {"ok": False, "error": f"prefill of room {room_id} failed"})
            room.done = True
            if room.decode_gone.done() or room.writer is None:
                self._rooms.pop(room_id, None)

    @staticmethod
    def _reply(room: _Room, msg: dict[str, Any]) -> None:
        if room.writer is not None and not room.writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                room.writer.write(orjson.dumps(msg) + b"\n")


async def await_kv(
    host: str, port: int, room_id: int, prompt_tokens: int, timeout_s: float
) -> dict[str, Any]:
    """Decode side: register for a room and wait for the prefill's aux data."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(orjson.dumps({"room": room_id, "prompt_tokens": prompt_tokens}) + b"\n")
            line = await reader.readline()
    except TimeoutError:
        raise RequestTimeoutError(f"room {room_id}: no KV from the prefill side in {timeout_s:g}s") from None
    except OSError as exc:
        raise RoomFailed(f"room {room_id}: cannot reach bootstrap {host}:{port}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
    if not line:
        raise RoomFailed(f"room {room_id}: the prefill side closed the rendezvous")
    msg = orjson.loads(line)
    if not msg.get("ok"):
        raise RoomFailed(f"room {room_id}: {msg.get('error', 'prefill failed')}")
    return dict(msg)
