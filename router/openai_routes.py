"""OpenAI endpoints of the router: ``pdserve.api.OpenAIServing`` over the PD backend.

Per-request lifecycle:

1. Parse the body into the api layer's request model (every client mistake is a 400; unknown
   model 404; prompt beyond the context 400 -- raised by ``OpenAIServing``).
2. Admit (429 beyond ``max_inflight_requests``), start a disconnect watcher.
3. ``OpenAIServing.chat/completion`` templates, tokenises and calls :class:`PDBackend`; a streamed
   answer is returned only after its first delta, so failures before it are real HTTP statuses.
4. Streams hand disconnect handling to Starlette (the generator is cancelled and closes the
   backend, which aborts both legs); non-streamed requests rely on the watcher. Whatever happens
   to the stream (even a disconnect before its first byte), the response's cleanup closes the
   stream, aborts the committed exchange if it is still open, and releases the admission slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pdserve.api.backend import RequestContext
from pdserve.api.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from pdserve.api.serving import OpenAIServing
from pdserve.errors import OverloadedError, PdserveError
from pdserve.router.disconnect import DisconnectWatch
from pdserve.router.dispatch import Exchange
from pdserve.router.openai_backend import PDBackend
from pdserve.router.passthrough import outcome_of
from pdserve.router.state import RouterState

DEFAULT_MAX_MODEL_LEN = 32768
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(eq=False)
class RouterContext(RequestContext):
    """The api layer's request context plus the router's committed exchange (for cleanup)."""

    exchange: Exchange | None = None


class _GuardedStream(StreamingResponse):
    """A streaming response whose cleanup runs however the response ends (or never starts)."""

    def __init__(self, body: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


class OpenAIRoutes:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self._serving: OpenAIServing | None = None

    def serving(self) -> OpenAIServing:
        if self._serving is None:
            st = self.state
            if st.tokenizer is None or st.served_model_name is None:
                raise OverloadedError(
                    "the router has no tokenizer yet: start it with --model DIR, or wait until a worker "
                    "reports a local model_path on /get_model_info"
                )
            max_len = st.max_model_len or getattr(st.tokenizer, "model_max_length", None)
            self._serving = OpenAIServing(
                PDBackend(st), st.tokenizer, served_model_name=st.served_model_name,
                model_max_len=int(max_len or DEFAULT_MAX_MODEL_LEN), owned_by="pdserve",
                first_output_timeout_s=st.cfg.timeouts.read_s, output_timeout_s=st.cfg.timeouts.read_s,
            )
        return self._serving

    async def models(self) -> dict[str, Any]:
        try:
            return self.serving().models()
        except OverloadedError:
            name = self.state.served_model_name
            data = [] if name is None else [{"id": name, "object": "model", "owned_by": "pdserve"}]
            return {"object": "list", "data": data}

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completions")

    async def _handle(self, request: Request, route: str) -> Response:
        st = self.state
        raw = await request.body()
        try:
            serving = self.serving()
            ctx = RouterContext(disconnect_check=request.is_disconnected)
            if route == "chat":
                chat_req = parse_request(raw, ChatCompletionRequest)
                st.admit()
                call = serving.chat(chat_req, ctx)
            else:
                cmpl_req = parse_request(raw, CompletionRequest)
                st.admit()
                call = serving.completion(cmpl_req, ctx)
        except PdserveError as exc:
            st.metrics.request(route, "rejected" if exc.http_status == 429 else outcome_of(exc))
            raise
        watch = DisconnectWatch(request.receive)
        try:
            result = await call
        except asyncio.CancelledError:
            watch.stop()
            st.release()
            if not watch.fired:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            st.metrics.request(route, "cancelled")
            return Response(status_code=499)
        except PdserveError as exc:
            watch.stop()
            st.release()
            st.metrics.request(route, outcome_of(exc))
            raise
        except BaseException:
            watch.stop()
            st.release()
            raise
        watch.stop()
        if isinstance(result, dict):
            st.release()
            st.metrics.request(route, "success")
            return Response(orjson.dumps(result), media_type="application/json")
        stream = result
        done = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal done
            async for chunk in stream:
                yield chunk
            done = True

        async def cleanup() -> None:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if ctx.exchange is not None:
                ctx.exchange.abort("client")  # no-op when the stream finished normally
            st.release()
            st.metrics.request(route, "success" if done else "cancelled")

        return _GuardedStream(body(), cleanup)
