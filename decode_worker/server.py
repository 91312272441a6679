"""The worker's HTTP server: SGLang's PD worker protocol plus the OpenAI API, for all three roles.

``build_app(config) -> FastAPI``. State (engine, KV transfer services, metrics) is built in the
app's lifespan (:class:`WorkerState`); nothing lives in module globals. Endpoints:

=============================  ===================================================================
``POST /generate``             SGLang native generate (JSON or SSE); carries the bootstrap triple
``POST /v1/chat/completions``  OpenAI chat (routers send these to both legs with the triple too)
``POST /v1/completions``       OpenAI completions
``GET  /v1/models``            the served model (``owned_by: "sglang"``: smg uses SGLang PD)
``GET  /health``               200 while the engine thread runs, else 503
``GET  /health_generate``      a real one-token generation through the engine
``GET  /get_model_info``       ``model_path`` = the local model directory (also ``/model_info``)
``GET  /get_server_info``      role, bootstrap port, transport, page size, limits, load (also
                               ``/server_info``, the name newer smg asks for first)
``GET  /get_load`` ``/load``   SGLang-style list of per-rank loads (+ KV blocks, usage, transport)
``GET  /version``              pdserve's version
``GET  /metrics``              Prometheus text of this app's registry
``POST /abort_request``        ``{"rid": ...}`` or ``{"abort_all": true}``
=============================  ===================================================================

Every error is an OpenAI error body (``install_error_handlers``); bodies over
``limits.max_body_bytes`` get 413 before they are read.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from pdserve import __version__
from pdserve.api.errors import BodySizeLimitMiddleware, install_error_handlers
from pdserve.api.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, parse_request
from pdserve.api.routes import request_context, respond
from pdserve.decode_worker.config import WorkerConfig
from pdserve.decode_worker.metrics import HttpMetricsMiddleware, WorkerMetrics
from pdserve.decode_worker.state import WorkerState
from pdserve.errors import InvalidRequestError, OverloadedError

logger = logging.getLogger(__name__)


class _Runtime:
    """The app's handle on its state (set by the lifespan; None before start / after stop)."""

    def __init__(self) -> None:
        self.state: WorkerState | None = None

    def get(self) -> WorkerState:
        if self.state is None:
            raise OverloadedError("the worker is starting or shutting down")
        return self.state

    def metrics(self) -> WorkerMetrics | None:
        return self.state.metrics if self.state is not None else None


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def build_app(config: WorkerConfig) -> FastAPI:
    """The worker's ASGI app for ``config.role`` (``prefill``, ``decode`` or ``both``)."""
    runtime = _Runtime()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await WorkerState.start(config)
        runtime.state = state
        app.state.worker = state
        try:
            yield
        finally:
            runtime.state = None
            await state.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.include_router(_routes(runtime))
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.limits.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=runtime.metrics)
    return app


def _routes(runtime: _Runtime) -> APIRouter:
    router = APIRouter()

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        state = runtime.get()
        req = parse_request(await request.body(), GenerateRequest)
        return respond(await state.native.generate(req, request_context(request)))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state = runtime.get()
        req = parse_request(await request.body(), ChatCompletionRequest)
        return respond(await state.openai.chat(req, request_context(request)))

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        state = runtime.get()
        req = parse_request(await request.body(), CompletionRequest)
        return respond(await state.openai.completion(req, request_context(request)))

    @router.get("/v1/models")
    async def models() -> Response:
        return _json(runtime.get().openai.models())

    @router.get("/health")
    async def health() -> Response:
        state = runtime.get()
        if not state.healthy:
            return _json({"status": "unhealthy", "role": state.config.role}, 503)
        return _json({"status": "ok", "role": state.config.role})

    @router.api_route("/health_generate", methods=["GET", "POST"])
    async def health_generate() -> Response:
        state = runtime.get()
        if not await state.health_generate():
            return _json({"status": "unhealthy", "role": state.config.role}, 503)
        return _json({"status": "ok", "role": state.config.role})

    @router.get("/get_model_info")
    @router.get("/model_info")
    async def model_info() -> Response:
        return _json(runtime.get().model_info())

    @router.get("/get_server_info")
    @router.get("/server_info")
    async def server_info() -> Response:
        return _json(runtime.get().server_info())

    @router.get("/get_load")
    @router.get("/load")
    async def load() -> Response:
        return _json([runtime.get().load_report()])

    @router.get("/version")
    async def version() -> Response:
        return _json({"version": __version__, "engine": "pdserve"})

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(runtime.get().registry), media_type=CONTENT_TYPE_LATEST)

    @router.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        state = runtime.get()
        rid, abort_all = _abort_fields(await request.body())
        n = state.backend.abort(None if abort_all else rid)
        return _json({"aborted": n})

    return router


def _abort_fields(body: bytes) -> tuple[str | None, bool]:
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object")
    rid, abort_all = data.get("rid"), data.get("abort_all", False)
    if not isinstance(abort_all, bool):
        raise InvalidRequestError("abort_all must be a boolean", param="abort_all")
    if not abort_all and (not isinstance(rid, str) or not rid):
        raise InvalidRequestError("give rid (a request id) or abort_all: true", param="rid")
    return (rid if isinstance(rid, str) else None), abort_all


def build_worker_app(
    *,
    host: str,
    port: int,
    role: str,
    bootstrap_port: int | None = None,
    config: dict[str, Any] | None = None,
    **overrides: Any,
) -> FastAPI:
    """App factory for the fleet (``factory(host=, port=, role=, [bootstrap_port=,] config=)``):
    ``config`` is the whole pdserve config as a dict; its ``engine`` and ``kvtransfer`` sections
    are used, ``overrides`` are further :class:`WorkerConfig` fields (``limits``, ...)."""
    sections: dict[str, Any] = {}
    if config is not None:
        from pdserve.config import parse_config

        full = parse_config(config, source="fleet")
        sections = {"engine": full.engine, "kvtransfer": full.kvtransfer}
    fields: dict[str, Any] = {**sections, **overrides, "host": host, "port": port, "role": role}
    if bootstrap_port is not None:
        fields["bootstrap_port"] = bootstrap_port
    return build_app(WorkerConfig.build(**fields))
