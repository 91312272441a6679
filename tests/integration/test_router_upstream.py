"""The router's pooled HTTP/1.1 client against tiny raw servers on 127.0.0.1: keep-alive reuse, stale
connection re-send, timeouts, abort, chunked and large bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from pdserve.router.errors import UpstreamConnectError, UpstreamStatusError, UpstreamTimeoutError
from pdserve.router.upstream import HttpClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[tuple[str, int], list[int]]]:
    conns: list[int] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield ("127.0.0.1", port), conns
    finally:
        srv.close()


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await r.readexactly(length) if length else b""


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuse_and_json() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            body = await read_request(r)
            w.write(ok(b'{"len": %d}' % len(body)))

    async with server(handler) as (addr, conns):
        c = HttpClient()
        for i in range(3):
            resp = await c.request(addr, b"POST", b"/x", b"x" * i)
            assert resp.status == 200 and await resp.read() == b'{"len": %d}' % i
        assert await c.get_json(addr, "/y", 1.0) == {"len": 0}
        assert len(conns) == 1, "one keep-alive connection for all requests"
        assert c.idle_count(addr) == 1
        await c.aclose()


async def test_stale_idle_connection_is_resent_once() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(ok(b"first"))  # advertises keep-alive, then drops the connection when idle
        await w.drain()
        await r.read(1)  # the next request arrives ... and the connection is closed unanswered

    async with server(handler) as (addr, conns):
        c = HttpClient()
        assert await (await c.request(addr, b"POST", b"/", b"{}")).read() == b"first"
        resp = await c.request(addr, b"POST", b"/", b"{}")
        assert await resp.read() == b"first"
        assert len(conns) == 2
        await c.aclose()


async def test_read_timeout_and_status_errors() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await asyncio.sleep(10)

    async with server(silent) as (addr, _):
        c = HttpClient(read_s=0.3)
        with pytest.raises(UpstreamTimeoutError):
            await asyncio.wait_for(c.request(addr, b"POST", b"/", b"{}"), 5)
        with pytest.raises(UpstreamTimeoutError):
            await c.get_json(addr, "/health", 0.2)
        await c.aclose()

    async def busy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")

    async with server(busy) as (addr, _):
        c = HttpClient()
        with pytest.raises(UpstreamStatusError) as info:
            await c.get_json(addr, "/health", 1.0)
        assert info.value.status == 503 and info.value.body == b"busy"
        await c.aclose()


async def test_connect_refused() -> None:
    async with server(read_request) as (addr, _):
        pass  # closed: nothing listens on the port any more
    c = HttpClient(connect_s=1.0)
    with pytest.raises(UpstreamConnectError):
        await c.request(addr, b"GET", b"/")
    await c.aclose()


async def test_chunked_stream_abort_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n")
        for i in range(100):
            data = b"data: %d\n\n" % i
            w.write(b"%x\r\n%s\r\n" % (len(data), data))
            await w.drain()
            await asyncio.sleep(0.02)
            if r.at_eof():
                break
        await r.read()
        closed.set()

    async with server(handler) as (addr, _):
        c = HttpClient()
        resp = await c.request(addr, b"POST", b"/generate", b"{}")
        assert resp.header(b"content-type") == b"text/event-stream"
        first = await resp.next_chunk()
        assert first is not None and first.startswith(b"data: 0")
        resp.abort()
        await asyncio.wait_for(closed.wait(), 3)
        assert c.idle_count(addr) == 0, "an abandoned connection is never pooled"
        await c.aclose()


async def test_large_body_with_back_pressure() -> None:
    big = bytes(range(256)) * 16384  # 4 MiB

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(ok(big))
        await w.drain()
        await r.read()

    async with server(handler) as (addr, _):
        c = HttpClient()
        resp = await c.request(addr, b"GET", b"/")
        total = bytearray()
        while (chunk := await resp.next_chunk()) is not None:
            total += chunk
            await asyncio.sleep(0)  # a slow consumer
        assert bytes(total) == big
        await c.aclose()
