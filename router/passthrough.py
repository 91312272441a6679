"""Native ``POST /generate`` pass-through: raw ASGI, no per-request pydantic.

Lifecycle of one request:

1. Read the body (bounded by ``max_body_bytes``: 413), parse it with orjson (400 on garbage),
   derive the routing key (input_ids, or text -- tokenised only when cache-aware routing needs
   ids and a tokenizer is loaded).
2. Start a disconnect watcher: if the client goes away, the handler is cancelled, which aborts
   both legs (their connections close, the workers abort and free their pages).
3. ``Dispatcher.open`` adds the bootstrap fields, dispatches both legs, retries before commit.
4. Stream the decode leg's bytes back unchanged (or its whole body when not streaming). An
   upstream failure after the first byte ends the stream with an SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from pdserve.api.asgi import Receive, Scope, Send
from pdserve.errors import InvalidRequestError, PayloadTooLargeError, PdserveError
from pdserve.router.disconnect import DisconnectWatch
from pdserve.router.dispatch import Exchange
from pdserve.router.errors import NoWorkerError, UpstreamStatusError
from pdserve.router.state import RouterState

logger = logging.getLogger(__name__)


_JSON = b"application/json"


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise InvalidRequestError("invalid Content-Length header") from None
            if declared > limit:
                raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the {limit}-byte limit")
            break
    msg = await receive()
    body: bytes = msg.get("body", b"")
    if not msg.get("more_body"):
        return body
    parts = [body]
    size = len(body)
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise asyncio.CancelledError()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds the {limit}-byte limit")
        parts.append(chunk)
        if not msg.get("more_body"):
            return b"".join(parts)


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes = _JSON,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_body(exc: PdserveError) -> tuple[int, bytes]:
    """Status and body for an error: a worker's own non-2xx answer passes through unchanged when
    it is JSON; everything else becomes an OpenAI error object."""
    if isinstance(exc, UpstreamStatusError) and exc.body[:1] in (b"{", b"["):
        return exc.status, exc.body
    status = exc.status if isinstance(exc, UpstreamStatusError) else exc.http_status
    return status, orjson.dumps(exc.to_openai())


def sse_error(exc: BaseException) -> bytes:
    err = exc if isinstance(exc, PdserveError) else PdserveError(str(exc))
    return b"data: " + orjson.dumps(err.to_openai()) + b"\n\ndata: [DONE]\n\n"


def _route_header(ex: Exchange) -> tuple[bytes, bytes]:
    r = ex.route
    pf = r.prefill.url if r.prefill is not None else "-"
    return b"x-pdserve-route", f"{r.mode} prefill={pf} target={r.target.url}".encode()


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object (400 otherwise)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return data


async def handle_generate(state: RouterState, scope: Scope, receive: Receive, send: Send) -> None:
    t0 = time.monotonic()
    metrics = state.metrics
    try:
        raw = await read_body(scope, receive, state.cfg.max_body_bytes)
        req = json_object(raw)
        key, batch = state.prompt_key(req)
        state.admit()
    except PdserveError as exc:
        metrics.request("generate", "rejected" if exc.http_status == 429 else "client_error")
        status, body = error_body(exc)
        await send_bytes(send, status, body)
        return
    except asyncio.CancelledError:
        return
    stream = bool(req.get("stream"))
    watch = DisconnectWatch(receive)
    ex: Exchange | None = None
    outcome = "success"
    try:
        ex = await state.dispatcher.open(req, key, stream=stream, batch=batch)
        headers = [(b"content-type", ex.content_type)]
        if state.cfg.route_header:
            headers.append(_route_header(ex))
        mode = ex.route.mode
        if not stream:
            headers.append((b"content-length", b"%d" % len(ex.first)))
            watch.stop()
            await send({"type": "http.response.start", "status": ex.status, "headers": headers})
            await send({"type": "http.response.body", "body": ex.first, "more_body": False})
            ex.finish(ok=True)
            metrics.observe_e2e(mode, time.monotonic() - t0)
            return
        headers.append((b"cache-control", b"no-cache"))
        await send({"type": "http.response.start", "status": ex.status, "headers": headers})
        await send({"type": "http.response.body", "body": ex.first, "more_body": True})
        last = time.monotonic()
        metrics.observe_ttft(mode, last - t0)
        itl = metrics.itl.observe
        try:
            while (chunk := await ex.next_chunk()) is not None:
                now = time.monotonic()
                itl(now - last)
                last = now
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except PdserveError as exc:
            logger.warning("decode stream from %s failed mid-response: %s", ex.route.target.url, exc)
            outcome = "upstream_error"
            ex.finish(ok=False, error=exc)
            watch.stop()
            await send({"type": "http.response.body", "body": sse_error(exc), "more_body": False})
            return
        watch.stop()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        ex.finish(ok=True)
        metrics.observe_e2e(mode, last - t0)
    except asyncio.CancelledError:
        if not watch.fired:
            raise
        outcome = "cancelled"
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        if ex is not None:
            ex.abort("client")
    except PdserveError as exc:
        watch.stop()
        outcome = outcome_of(exc)
        if ex is None:
            status, body = error_body(exc)
            await send_bytes(send, status, body)
    finally:
        watch.stop()
        if ex is not None:
            if outcome == "cancelled":
                ex.abort("client")
            else:
                ex.finish(ok=outcome == "success")
        state.release()
        metrics.request("generate", outcome)


def outcome_of(exc: PdserveError) -> str:
    if isinstance(exc, NoWorkerError):
        return "no_worker"
    if isinstance(exc, UpstreamStatusError):
        return "client_error" if exc.status < 500 else "upstream_error"
    return "client_error" if exc.http_status < 500 else "upstream_error"
