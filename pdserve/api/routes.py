"""FastAPI routes for the shared endpoints, so the router and the workers mount the same code.

``api_router(serving, native=...)`` gives ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` and, with a :class:`NativeServing`, ``POST /generate``. Bodies are parsed with
orjson and validated by :func:`parse_request` (every client mistake is a 400 naming the field);
pair it with :func:`pdserve.api.errors.install_error_handlers` and, for a body limit,
:class:`pdserve.api.errors.BodySizeLimitMiddleware`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from pdserve.api.backend import RequestContext
from pdserve.api.native_serving import NativeServing
from pdserve.api.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, parse_request
from pdserve.api.serving import OpenAIServing

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def respond(result: dict[str, Any] | AsyncIterator[bytes]) -> Response:
    """A JSON body or an SSE stream, as returned by the serving classes."""
    if isinstance(result, dict):
        return Response(orjson.dumps(result), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


def request_context(request: Request) -> RequestContext:
    return RequestContext(disconnect_check=request.is_disconnected)


def api_router(serving: OpenAIServing, *, native: NativeServing | None = None) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(await request.body(), ChatCompletionRequest)
        return respond(await serving.chat(req, request_context(request)))

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(await request.body(), CompletionRequest)
        return respond(await serving.completion(req, request_context(request)))

    @router.get("/v1/models")
    async def models() -> Response:
        return Response(orjson.dumps(serving.models()), media_type="application/json")

    if native is not None:
        native_serving = native

        @router.post("/generate")
        async def generate(request: Request) -> Response:
            req = parse_request(await request.body(), GenerateRequest)
            return respond(await native_serving.generate(req, request_context(request)))

    return router
