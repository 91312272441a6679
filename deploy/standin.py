"""Stand-in worker and router apps: exercise the fleet's mechanics without a model.

``fleet: {worker_app: {factory: pdserve.deploy.standin:build_worker_app}, router_app: {factory:
pdserve.deploy.standin:build_router_app}}`` runs a whole fleet (placement, actors, registration,
health, scale, drain, restart) in seconds. The worker answers the endpoints the fleet and routers
probe (``/health``, ``/get_load``, ``/v1/models``) and a deterministic ``/v1/completions`` /
``/generate`` that takes ``delay_s``; a prefill worker also listens on its bootstrap port (as
routers probe it). The router keeps a registry (``POST/GET/DELETE /workers``) and sends each
completion to one prefill (``/generate``) and one decode worker (``/v1/completions``) at once,
round robin, WITHOUT retries, so any request lost by scaling or a dead worker surfaces as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_STANDIN_MODEL = "standin"


def _models(model: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "pdserve"}],
    }


def build_worker_app(
    *,
    host: str,
    port: int,
    role: str,
    bootstrap_port: int | None = None,
    config: dict[str, Any] | None = None,
    model: str = _STANDIN_MODEL,
    delay_s: float = 0.0,
) -> FastAPI:
    """A worker of ``role`` (prefill/decode/both) that answers after ``delay_s`` seconds.
    ``config`` (the fleet's pdserve config) is accepted and ignored."""
    state: dict[str, Any] = {"running": 0, "served": 0}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        bootstrap: asyncio.Server | None = None
        if bootstrap_port is not None:
            bootstrap = await asyncio.start_server(_close_at_once, host, bootstrap_port)
        try:
            yield
        finally:
            if bootstrap is not None:
                bootstrap.close()
                await bootstrap.wait_closed()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/get_load")
    async def get_load() -> dict[str, Any]:
        return {
            "num_reqs": state["running"],
            "num_waiting_reqs": 0,
            "num_tokens": 0,
            "kv_usage": 0.0,
            "transport": "fake",
            "role": role,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return _models(model)

    async def _work(body: dict[str, Any]) -> str:
        state["running"] += 1
        try:
            await asyncio.sleep(delay_s)
        finally:
            state["running"] -= 1
        state["served"] += 1
        prompt = str(body.get("prompt", body.get("text", "")))
        return f" {role}:{port} saw {len(prompt)} chars"

    @app.post("/generate")
    async def generate(request: Request) -> dict[str, Any]:
        body = await request.json()
        text = await _work(body)
        return {"text": text, "meta_info": {"prompt_tokens": 1, "completion_tokens": 1}}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await request.json()
        text = await _work(body)
        return {
            "id": f"cmpl-{port}-{state['served']}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model", model),
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


async def _close_at_once(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def build_router_app(
    *,
    host: str,
    port: int,
    role: str = "router",
    config: dict[str, Any] | None = None,
    model: str = _STANDIN_MODEL,
    timeout_s: float = 30.0,
) -> FastAPI:
    """A minimal PD router with dynamic registration (no retries, no policy but round robin)."""
    workers: dict[str, dict[str, Any]] = {}
    counter = itertools.count()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return _models(model)

    @app.get("/workers")
    async def list_workers() -> dict[str, Any]:
        return {"workers": list(workers.values())}

    @app.post("/workers")
    async def add_worker(request: Request) -> JSONResponse:
        body = await request.json()
        url, worker_role = body.get("url"), body.get("role")
        if not isinstance(url, str) or worker_role not in {"prefill", "decode", "both"}:
            return JSONResponse({"error": {"message": "need url and role"}}, status_code=400)
        workers[url] = {"url": url, "role": worker_role, "bootstrap_port": body.get("bootstrap_port")}
        return JSONResponse({"status": "ok", "url": url})

    @app.delete("/workers")
    async def remove_worker(request: Request) -> JSONResponse:
        url = request.query_params.get("url")
        if url is None:
            with contextlib.suppress(ValueError):
                url = (await request.json()).get("url")
        if url not in workers:
            return JSONResponse({"error": {"message": f"unknown worker {url!r}"}}, status_code=404)
        del workers[url]
        return JSONResponse({"status": "ok", "url": url})

    def _pick(kind: str) -> dict[str, Any] | None:
        pool = [w for w in workers.values() if w["role"] in {kind, "both"}]
        return pool[next(counter) % len(pool)] if pool else None

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        prefill, decode = _pick("prefill"), _pick("decode")
        if prefill is None or decode is None:
            return JSONResponse({"error": {"message": "no prefill/decode worker"}}, status_code=503)
        client: httpx.AsyncClient = request.app.state.client
        pd_body = {**body, "bootstrap_host": prefill["url"], "bootstrap_port": prefill["bootstrap_port"]}
        try:
            p_resp, d_resp = await asyncio.gather(
                client.post(f"{prefill['url']}/generate", json=pd_body),
                client.post(f"{decode['url']}/v1/completions", json=pd_body),
            )
        except httpx.HTTPError as exc:
            return JSONResponse({"error": {"message": f"worker failed: {exc!r}"}}, status_code=502)
        if p_resp.status_code != 200:
            return JSONResponse({"error": {"message": f"prefill: {p_resp.text}"}}, status_code=502)
        return JSONResponse(d_resp.json(), status_code=d_resp.status_code)

    return app
