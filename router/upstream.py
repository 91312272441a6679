"""The router's one pooled HTTP/1.1 client for worker traffic (asyncio Protocol + httptools).

Chosen over httpx on the hot path with measured evidence (docs/benchmarks.md, "Router /
serving"): it costs a fraction of httpx's CPU per request. It does only what the router needs:
JSON POST/GET to ``http://host:port``, keep-alive pooling per worker, TCP_NODELAY, streamed
bodies with back-pressure, connect and read (inactivity) timeouts, and abort.

Lifecycle of one request:

1. ``start()`` takes an idle pooled connection (or connects, bounded by ``connect_s``) and writes
   the request in one ``write``.
2. ``wait_headers()`` waits for the status line and headers. If a reused keep-alive connection
   dies before answering a single byte (the server closed it while idle) the request is re-sent
   once on a fresh connection.
3. The body is consumed with ``next_chunk()`` (coalesces whatever is buffered) or ``read()``.
   Each wait for bytes is bounded by ``read_s`` seconds of silence.
4. A complete keep-alive response returns its connection to the pool; any error, ``abort()`` or
   cancellation of the consumer closes the connection instead -- which is how a worker learns
   that its client went away and aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from typing import Any

import httptools
import orjson

from pdserve.router.errors import UpstreamConnectError, UpstreamStatusError, UpstreamTimeoutError

logger = logging.getLogger(__name__)

Addr = tuple[str, int]
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18


class _Conn(asyncio.Protocol):
    __slots__ = ("addr", "closed", "idle_since", "last_activity", "parser", "resp", "transport", "uses")

    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.resp: UpstreamResponse | None = None
        self.closed = False
        self.uses = 0
        self.idle_since = 0.0
        self.last_activity = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None or self.parser is None:  # bytes while idle: the server misbehaves
            self.close()
            return
        resp.got_bytes = True
        self.last_activity = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp.fail(UpstreamConnectError(f"bad HTTP response from {_fmt(self.addr)}: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None and not resp.done:
            resp.fail(UpstreamConnectError(f"connection to {_fmt(self.addr)} lost", reused=self.uses > 1))

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()


def _fmt(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


class UpstreamResponse:
    """One in-flight request/response on a pooled connection (parser callbacks land here)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_client",
        "_error",
        "_payload",
        "_timer",
        "_waiter",
        "conn",
        "done",
        "got_bytes",
        "headers",
        "headers_done",
        "keep_alive",
        "released",
        "status",
    )

    def __init__(self, client: HttpClient, conn: _Conn, payload: bytes) -> None:
        self._client = client
        self._payload = payload
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.done = False
        self.got_bytes = False
        self.keep_alive = True
        self.released = False
        self._bind(conn)

    def _bind(self, conn: _Conn) -> None:
        self.conn = conn
        conn.resp = self
        conn.parser = httptools.HttpResponseParser(self)
        conn.uses += 1
        conn.last_activity = time.monotonic()
        if conn.transport is None:
            raise UpstreamConnectError(f"connection to {_fmt(conn.addr)} is not open")
        conn.transport.write(self._payload)

    # ---- httptools callbacks -----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.conn.parser
        if parser is not None:
            self.status = parser.get_status_code()
            self.keep_alive = parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER:
            self.conn.pause()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    # ---- state -------------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if self._error is None and not self.done:
            self._error = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    def abort(self, exc: BaseException | None = None) -> None:
        """Stop now: close the connection (the worker sees a client disconnect)."""
        if not self.released:
            self.fail(exc or UpstreamConnectError(f"request to {_fmt(self.conn.addr)} aborted"))
            self._finish(reuse=False)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def _on_timer(self) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done():
            return
        idle = time.monotonic() - self.conn.last_activity
        limit = self._client.read_s
        if idle >= limit:
            where = _fmt(self.conn.addr)
            w.set_exception(UpstreamTimeoutError(f"no response bytes from {where} in {limit:g}s"))
        else:
            self._timer = asyncio.get_running_loop().call_later(limit - idle, self._on_timer)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        if self._timer is None:
            self._timer = loop.call_later(self._client.read_s, self._on_timer)
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _finish(self, reuse: bool) -> None:
        if self.released:
            return
        self.released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self.conn
        conn.resp = None
        conn.parser = None
        if reuse and self.keep_alive and self.done and not conn.closed:
            self._client.release(conn)
        else:
            conn.close()

    # ---- consumer API ------------------------------------------------------------------------
    async def wait_headers(self) -> None:
        """Wait for status + headers (re-sends once if a reused idle connection was stale)."""
        try:
            while not self.headers_done:
                try:
                    await self._wait()
                except UpstreamConnectError as exc:
                    if self.got_bytes or not exc.details.get("reused") or self.released:
                        raise
                    logger.debug("stale keep-alive connection to %s; re-sending", _fmt(self.conn.addr))
                    old = self.conn
                    old.resp = None
                    old.close()
                    self._error = None
                    self._bind(await self._client.connect(old.addr))
        except BaseException:
            self._finish(reuse=False)
            raise

    async def next_chunk(self) -> bytes | None:
        """The next body bytes (all that is buffered), or None at the end of the body."""
        try:
            while not self._chunks:
                if self.done:
                    self._finish(reuse=True)
                    return None
                await self._wait()
        except BaseException:
            self._finish(reuse=False)
            raise
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        if self._buffered > _HIGH_WATER:
            self.conn.resume()
        self._buffered = 0
        if self.done:
            self._finish(reuse=True)
        return data

    async def read(self) -> bytes:
        """The whole (remaining) body."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)


class HttpClient:
    """Connection pool keyed by ``(host, port)``; see the module docstring."""

    def __init__(
        self,
        *,
        connect_s: float = 3.0,
        read_s: float = 600.0,
        pool_idle_s: float = 30.0,
        max_idle_per_addr: int = 256,
    ) -> None:
        self.connect_s = connect_s
        self.read_s = read_s
        self.pool_idle_s = pool_idle_s
        self.max_idle_per_addr = max_idle_per_addr
        self._idle: dict[Addr, list[_Conn]] = {}
        self._hosts: dict[Addr, bytes] = {}
        self._closed = False

    async def connect(self, addr: Addr) -> _Conn:
        if self._closed:
            raise UpstreamConnectError("HTTP client is closed")
        loop = asyncio.get_running_loop()
        conn = _Conn(addr)
        try:
            async with asyncio.timeout(self.connect_s):
                await loop.create_connection(lambda: conn, addr[0], addr[1])
        except TimeoutError as exc:
            conn.close()
            raise UpstreamTimeoutError(
                f"connect to {_fmt(addr)} timed out after {self.connect_s:g}s"
            ) from exc
        except OSError as exc:
            conn.close()
            raise UpstreamConnectError(f"cannot connect to {_fmt(addr)}: {exc}") from exc
        return conn

    async def acquire(self, addr: Addr) -> _Conn:
        pool = self._idle.get(addr)
        if pool:
            now = time.monotonic()
            while pool:
                conn = pool.pop()
                if not conn.closed and now - conn.idle_since < self.pool_idle_s:
                    return conn
                conn.close()
        return await self.connect(addr)

    def release(self, conn: _Conn) -> None:
        pool = self._idle.setdefault(conn.addr, [])
        if self._closed or len(pool) >= self.max_idle_per_addr:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        pool.append(conn)

    def _head(self, addr: Addr) -> bytes:
        host = self._hosts.get(addr)
        if host is None:
            host = self._hosts[addr] = f"{addr[0]}:{addr[1]}".encode()
        return host

    async def start(
        self,
        addr: Addr,
        method: bytes,
        path: bytes,
        body: bytes | None = None,
        content_type: bytes = b"application/json",
    ) -> UpstreamResponse:
        """Send a request; the response's headers are still pending (``wait_headers``)."""
        host = self._head(addr)
        if body is None:
            payload = b"%s %s HTTP/1.1\r\nhost: %s\r\n\r\n" % (method, path, host)
        else:
            payload = b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
                method, path, host, content_type, len(body), body,
            )
        conn = await self.acquire(addr)
        try:
            return UpstreamResponse(self, conn, payload)
        except BaseException:
            conn.close()
            raise

    async def request(
        self, addr: Addr, method: bytes, path: bytes, body: bytes | None = None
    ) -> UpstreamResponse:
        resp = await self.start(addr, method, path, body)
        await resp.wait_headers()
        return resp

    async def get_json(self, addr: Addr, path: str, timeout_s: float) -> Any:
        """GET a small JSON document (health/load polls); non-2xx raises UpstreamStatusError."""
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.request(addr, b"GET", path.encode())
                body = await resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"GET {_fmt(addr)}{path} timed out after {timeout_s:g}s") from exc
        if resp.status >= 300:
            raise UpstreamStatusError(
                f"GET {_fmt(addr)}{path} -> {resp.status}", status=resp.status, body=body
            )
        if not body:
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return body.decode("utf-8", "replace")

    def idle_count(self, addr: Addr | None = None) -> int:
        if addr is not None:
            return sum(1 for c in self._idle.get(addr, []) if not c.closed)
        return sum(1 for pool in self._idle.values() for c in pool if not c.closed)

    def drop(self, addr: Addr) -> None:
        """Close the idle connections to one worker (it was removed)."""
        for conn in self._idle.pop(addr, []):
            conn.close()

    async def aclose(self) -> None:
        self._closed = True
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()
