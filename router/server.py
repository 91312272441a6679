"""The router's ASGI application.

``RouterApp`` is the ASGI entry point: ``POST /generate`` goes straight to the raw pass-through
(router/passthrough.py); everything else to a FastAPI app with the OpenAI endpoints (through
``pdserve.api.OpenAIServing`` over :class:`~pdserve.router.openai_backend.PDBackend`), worker
registration, health, model info and ``/metrics``.

Lifecycle (FastAPI lifespan): build :class:`RouterState` -> ``start()`` (health/load loops, model
discovery) -> serve -> ``aclose()`` (loops stopped, legs cancelled, pool closed).
"""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from pdserve.api.asgi import Receive, Scope, Send
from pdserve.api.errors import BodySizeLimitMiddleware, install_error_handlers
from pdserve.errors import InvalidRequestError, PdserveError
from pdserve.router.config import RouterConfig, WorkerSpec, normalize_url
from pdserve.router.openai_routes import OpenAIRoutes
from pdserve.router.passthrough import handle_generate, json_object
from pdserve.router.state import RouterState

logger = logging.getLogger(__name__)


class RouterApp:
    """ASGI app: fast path for native /generate, FastAPI for the rest."""

    def __init__(
        self,
        cfg: RouterConfig,
        *,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
        tokenizer: Any = None,
        freeze_gc: bool = False,
    ) -> None:
        self.cfg = cfg
        self._freeze_gc = freeze_gc
        self._registry = registry if registry is not None else CollectorRegistry()
        self._rng = rng
        self._tokenizer = tokenizer
        self.state: RouterState | None = None
        self.openai: OpenAIRoutes | None = None
        self.fastapi = self._build()
        self.app = BodySizeLimitMiddleware(self.fastapi, cfg.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if (state is not None and scope["type"] == "http" and scope["path"] == "/generate"
                and scope["method"] == "POST"):
            await handle_generate(state, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _need_state(self) -> RouterState:
        if self.state is None:
            raise PdserveError("the router is not started")
        return self.state

    @asynccontextmanager
    async def _lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        state = RouterState(self.cfg, registry=self._registry, rng=self._rng, tokenizer=self._tokenizer)
        await state.start()
        self.state = state
        self.openai = OpenAIRoutes(state)
        if self._freeze_gc:
            # Move everything alive after start-up out of the collector's reach, as SGLang's
            # servers do: later collections then scan only per-request garbage.
            gc.collect()
            gc.freeze()
        logger.info("router ready on %s:%d with %d workers", self.cfg.host, self.cfg.port, len(state.workers))
        try:
            yield
        finally:
            self.state = None
            await state.aclose()

    def _build(self) -> FastAPI:
        app = FastAPI(title="pdserve router", lifespan=self._lifespan, docs_url=None, redoc_url=None)

        install_error_handlers(app)

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/readiness")
        async def readiness() -> JSONResponse:
            st = self._need_state()
            reg = st.workers
            ok = any(w.routable() for w in reg.both) or (
                any(w.routable() for w in reg.decode)
                and (any(w.routable() for w in reg.prefill) or st.cfg.policy.local_prefill_threshold > 0)
            )
            return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/workers")
        async def list_workers() -> JSONResponse:
            st = self._need_state()
            return JSONResponse({"workers": [w.describe() for w in st.workers.all()]})

        @app.post("/workers")
        async def add_worker(request: Request) -> JSONResponse:
            st = self._need_state()
            data = json_object(await request.body())
            if "worker_type" in data and "role" not in data:  # smg's field name
                data["role"] = data.pop("worker_type")
            try:
                spec = WorkerSpec.model_validate(data)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise InvalidRequestError(f"invalid worker: {first['msg']}", param=str(first["loc"][0]) if
                                          first["loc"] else None) from None
            w = await st.register(spec)
            return JSONResponse(w.describe(), status_code=200)

        @app.delete("/workers")
        async def delete_worker(request: Request) -> JSONResponse:
            st = self._need_state()
            url = request.query_params.get("url")
            if url is None:
                raw = await request.body()
                url = json_object(raw).get("url") if raw else None
            if not isinstance(url, str):
                raise InvalidRequestError("give the worker url as ?url= or in a JSON body", param="url")
            w = st.unregister(normalize_url(url))
            return JSONResponse({"removed": w.url, "role": w.role})

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse(await self._openai().models())

        @app.get("/get_model_info")
        async def model_info() -> JSONResponse:
            st = self._need_state()
            return JSONResponse({
                "model_path": st.model_path, "tokenizer_path": st.model_path,
                "served_model_name": st.served_model_name, "is_generation": True,
            })

        @app.get("/get_server_info")
        async def server_info() -> JSONResponse:
            st = self._need_state()
            return JSONResponse({
                "router": "pdserve", "config": st.cfg.model_dump(mode="json"),
                "workers": [w.describe() for w in st.workers.all()],
            })

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._openai().chat(request)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._openai().completions(request)

        return app

    def _openai(self) -> OpenAIRoutes:
        if self.openai is None:
            raise PdserveError("the router is not started")
        return self.openai
