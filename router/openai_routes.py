"""OpenAI endpoints of the router: ``pdserve.api.OpenAIServing`` over the PD backend.

Per-request lifecycle:

1. Parse the body into the api layer's request model (every client mistake is a 400; unknown
   model 404; prompt beyond the context 400 -- raised by ``OpenAIServing``).
2. Admit (429 beyond ``max_inflight_requests``), start a disconnect watcher.
3. ``OpenAIServing.chat/completion`` templates, tokenises and calls :class:`PDBackend`; a streamed
   answer is returned only after its first delta, so failures before it are real HTTP statuses.
4. Streams hand disconnect handling to Starlette (the generator is cancelled and closes the
   backend, which aborts both legs); non-streamed requests rely on the watcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pdserve.api.backend import RequestContext
from pdserve.api.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from pdserve.api.serving import OpenAIServing
from pdserve.errors import OverloadedError, PdserveError
from pdserve.router.disconnect import DisconnectWatch
from pdserve.router.openai_backend import PDBackend
from pdserve.router.passthrough import outcome_of
from pdserve.router.state import RouterState

DEFAULT_MAX_MODEL_LEN = 32768


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
            ctx = RequestContext(disconnect_check=request.is_disconnected)
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
        return StreamingResponse(self._stream(result, route), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    async def _stream(self, it: AsyncIterator[bytes], route: str) -> AsyncIterator[bytes]:
        outcome = "cancelled"
        try:
            async for chunk in it:
                yield chunk
            outcome = "success"
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()
            self.state.release()
            self.state.metrics.request(route, outcome)
