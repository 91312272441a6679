"""A model-free worker speaking SGLang's PD HTTP protocol (tests, benchmark, router interop).

    python -m pdserve.router.fake_worker --role prefill|decode|both --port P [--bootstrap-port B]

It looks like an SGLang server to routers (``/v1/models`` entries ``owned_by: "sglang"``,
``/version``, ``/get_model_info`` with a local ``model_path``, ``/get_server_info``,
``/get_load``, ``/health``) and serves ``/generate`` (JSON and SSE, cumulative like SGLang or
incremental), ``/v1/completions`` and ``/v1/chat/completions``.

Request lifecycle (``/generate``):

1. Failure injection first (``fail_next`` -> ``fail_status``; ``hang``).
2. Prefill role: needs the bootstrap triple; waits for the decode leg on its bootstrap port,
   "computes" ``prefill_delay_s``, sends the aux data (first token) and answers a 1-token output.
   Decode role with the triple: registers for the room and waits for the aux data. Decode or
   colocated without it: prefills locally (conditional disaggregation / colocated serving).
3. Emits ``max_new_tokens`` tokens, ``token_delay_s`` apart (``drop_after_tokens`` drops the
   connection mid-stream). Tokens are a pure function of the prompt, so PD and colocated answers
   to the same prompt are identical.
4. A client disconnect at any point aborts the request (counted in ``/fake/stats`` as ``aborted``)
   and, through the rendezvous, fails the other leg (``peer_failed``).

Live control: ``POST /fake/config`` (change any setting), ``GET /fake/stats``, ``POST /fake/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pdserve.api.asgi import Receive, Scope, Send
from pdserve.errors import InvalidRequestError, PdserveError
from pdserve.router.disconnect import DisconnectWatch
from pdserve.router.fake_bootstrap import BootstrapServer, RoomFailed, await_kv
from pdserve.router.fake_format import FakeOutput, render_final, render_stream_event
from pdserve.router.passthrough import read_body, send_bytes

logger = logging.getLogger(__name__)

_GEN_PATHS = {"/generate": "native", "/v1/completions": "completion", "/v1/chat/completions": "chat"}


@dataclasses.dataclass
class FakeSettings:
    role: str = "both"
    model_path: str = ""
    served_model_name: str = "fake-model"
    num_tokens: int = 16  # when the request names no max tokens
    token_delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    rendezvous_timeout_s: float = 10.0
    fail_next: int = 0
    fail_status: int = 500
    drop_after_tokens: int | None = None
    hang: bool = False
    healthy: bool = True
    reply: str | None = None
    incremental: bool = False
    max_model_len: int = 4096
    total_kv_blocks: int = 4096
    block_size: int = 16
    load_override: dict[str, Any] | None = None


class _Drop(Exception):
    """Injected: drop the connection mid-stream."""


class FakeWorker:
    def __init__(
        self, settings: FakeSettings, host: str = "127.0.0.1", bootstrap_port: int | None = None
    ) -> None:
        self.s = settings
        self._initial = dataclasses.replace(settings)
        self.host = host
        self.bootstrap = BootstrapServer(host, bootstrap_port) if bootstrap_port else None
        self.stats: dict[str, Any] = {}
        self.reset()
        self.fastapi = self._build()

    def reset(self) -> None:
        self.stats = {"requests": 0, "completed": 0, "aborted": 0, "peer_failed": 0, "injected_failures": 0,
                      "local_prefill": 0, "active": 0, "prefilling_tokens": 0, "used_blocks": 0}
        self.rooms: deque[int] = deque(maxlen=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _GEN_PATHS:
            await self.handle(_GEN_PATHS[scope["path"]], scope, receive, send)
            return
        await self.fastapi(scope, receive, send)

    # ---- generation --------------------------------------------------------------------------
    async def handle(self, fmt: str, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            req = orjson.loads(await read_body(scope, receive, 64 << 20))
            if not isinstance(req, dict):
                raise InvalidRequestError("body must be a JSON object")
            out = FakeOutput.from_request(fmt, req, self.s)
        except (orjson.JSONDecodeError, PdserveError) as exc:
            err = exc if isinstance(exc, PdserveError) else InvalidRequestError(f"bad JSON: {exc}")
            await send_bytes(send, err.http_status, orjson.dumps(err.to_openai()))
            return
        st, s = self.stats, self.s
        st["requests"] += 1
        if s.fail_next > 0:
            s.fail_next -= 1
            st["injected_failures"] += 1
            err = PdserveError(f"fake worker: injected failure ({s.fail_status})")
            await send_bytes(send, s.fail_status, orjson.dumps(err.to_openai()))
            return
        watch = DisconnectWatch(receive)
        st["active"] += 1
        try:
            await self._generate(out, req, send)
        except asyncio.CancelledError:
            if not watch.fired:
                raise
            st["aborted"] += 1
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        finally:
            watch.stop()
            st["active"] -= 1

    async def _generate(self, out: FakeOutput, req: dict[str, Any], send: Send) -> None:
        s, st = self.s, self.stats
        if s.hang:
            await asyncio.sleep(3600)
        host, port, room = req.get("bootstrap_host"), req.get("bootstrap_port"), req.get("bootstrap_room")
        has_bootstrap = host is not None and port is not None and room is not None
        if isinstance(room, list):  # batched: one room per item; the fake uses the first
            host, port, room = host[0], port[0], room[0]  # type: ignore[index]
        try:
            if s.role == "prefill":
                if not has_bootstrap or self.bootstrap is None:
                    raise InvalidRequestError("a prefill worker needs bootstrap_host/port/room")
                self.rooms.append(int(room))  # type: ignore[arg-type]
                st["prefilling_tokens"] += out.prompt_tokens
                try:
                    aux = {"first_token": out.ids[0], "prompt_tokens": out.prompt_tokens, "cached_tokens": 0}
                    await self.bootstrap.prefill(int(room), s.prefill_delay_s,  # type: ignore[arg-type]
                                                 s.rendezvous_timeout_s, aux)
                finally:
                    st["prefilling_tokens"] -= out.prompt_tokens
                out.truncate(1)
            elif has_bootstrap:
                self.rooms.append(int(room))  # type: ignore[arg-type]
                aux = await await_kv(str(host), int(port), int(room),  # type: ignore[arg-type]
                                     out.prompt_tokens, s.rendezvous_timeout_s)
                if aux.get("first_token") != out.ids[0]:
                    raise RoomFailed("aux data does not match this request's prompt")
                out.input_lp = False
            else:
                st["local_prefill"] += 1
                if s.prefill_delay_s:
                    await asyncio.sleep(s.prefill_delay_s)
        except PdserveError as exc:
            if isinstance(exc, RoomFailed) or exc.http_status in (408, 502):
                st["peer_failed"] += 1
            await send_bytes(send, exc.http_status, orjson.dumps(exc.to_openai()))
            return
        blocks = -(-(out.prompt_tokens + len(out.ids)) // s.block_size)
        st["used_blocks"] += blocks
        try:
            if out.stream:
                await self._stream(out, send)
            else:
                if s.token_delay_s:
                    await asyncio.sleep(s.token_delay_s * len(out.ids))
                await send_bytes(send, 200, render_final(out))
            st["completed"] += 1
        finally:
            st["used_blocks"] -= blocks

    async def _stream(self, out: FakeOutput, send: Send) -> None:
        s = self.s
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        incremental = s.incremental or bool(out.req.get("incremental_streaming_output"))
        for i in range(len(out.ids)):
            if i and s.token_delay_s:
                await asyncio.sleep(s.token_delay_s)
            if s.drop_after_tokens is not None and i >= s.drop_after_tokens:
                raise _Drop("fake worker: injected connection drop")
            event = render_stream_event(out, i, incremental)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    # ---- everything else ---------------------------------------------------------------------
    def load(self) -> list[dict[str, Any]]:
        st, s = self.stats, self.s
        rep = {
            "dp_rank": 0, "num_reqs": st["active"], "num_waiting_reqs": 0, "num_running_reqs": st["active"],
            "num_tokens": st["used_blocks"] * s.block_size, "waiting_prefill_tokens": st["prefilling_tokens"],
            "free_kv_blocks": max(0, s.total_kv_blocks - st["used_blocks"]),
            "total_kv_blocks": s.total_kv_blocks,
        }
        rep.update(s.load_override or {})
        return [rep]

    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            if self.bootstrap is not None:
                await self.bootstrap.start()
            try:
                yield
            finally:
                if self.bootstrap is not None:
                    await self.bootstrap.aclose()

        app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None)
        s = self.s

        @app.get("/health")
        @app.get("/health_generate")
        async def health() -> Response:
            return Response(status_code=200 if s.healthy else 503)

        @app.get("/get_model_info")
        @app.get("/model_info")
        async def model_info() -> JSONResponse:
            return JSONResponse({"model_path": s.model_path, "tokenizer_path": s.model_path,
                                 "is_generation": True, "served_model_name": s.served_model_name})

        @app.get("/get_server_info")
        @app.get("/server_info")
        async def server_info() -> JSONResponse:
            bp = self.bootstrap.port if self.bootstrap is not None else None
            mode = {"prefill": "prefill", "decode": "decode"}.get(s.role, "null")
            return JSONResponse({"model_path": s.model_path, "disaggregation_mode": mode,
                                 "disaggregation_bootstrap_port": bp, "max_total_num_tokens":
                                 s.total_kv_blocks * s.block_size, "page_size": s.block_size,
                                 "context_length": s.max_model_len, "version": "0.5.0-fake"})

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{
                "id": s.served_model_name, "object": "model", "created": 0, "owned_by": "sglang",
                "root": s.served_model_name, "max_model_len": s.max_model_len}]})

        @app.get("/version")
        async def version() -> JSONResponse:
            return JSONResponse({"version": "0.5.0-fake"})

        @app.get("/get_load")
        @app.get("/load")
        async def get_load() -> JSONResponse:
            return JSONResponse(self.load())

        @app.get("/fake/stats")
        async def stats() -> JSONResponse:
            rooms = self.bootstrap.open_rooms if self.bootstrap is not None else 0
            return JSONResponse({**self.stats, "rooms": list(self.rooms), "open_rooms": rooms,
                                 "settings": dataclasses.asdict(s)})

        def apply(raw: bytes) -> JSONResponse:
            data = orjson.loads(raw) if raw else {}
            fields = {f.name for f in dataclasses.fields(FakeSettings)} - {"role"}
            unknown = set(data) - fields
            if unknown:
                return JSONResponse({"error": f"unknown settings {sorted(unknown)}"}, status_code=400)
            for k, v in data.items():
                setattr(s, k, v)
            return JSONResponse(dataclasses.asdict(s))

        @app.post("/fake/config")
        async def config(request: Request) -> JSONResponse:
            return apply(await request.body())

        @app.post("/fake/reset")
        async def reset(request: Request) -> JSONResponse:
            """Zero the counters, restore the start-up settings, then apply any given ones."""
            self.reset()
            for f in dataclasses.fields(FakeSettings):
                setattr(s, f.name, getattr(self._initial, f.name))
            return apply(await request.body())

        return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pdserve.router.fake_worker", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--role", choices=["prefill", "decode", "both"], required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bootstrap-port", type=int, default=None, help="prefill role: rendezvous port")
    ap.add_argument("--model-path", default=None, help="reported on /get_model_info (a local dir)")
    ap.add_argument("--served-model-name", default="fake-model")
    ap.add_argument("--num-tokens", type=int, default=16)
    ap.add_argument("--token-delay", type=float, default=0.0, metavar="S")
    ap.add_argument("--prefill-delay", type=float, default=0.0, metavar="S")
    ap.add_argument("--reply", default=None, help="fixed reply text instead of generated tokens")
    ap.add_argument("--incremental", action="store_true", help="stream deltas instead of cumulative text")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    if args.role == "prefill" and args.bootstrap_port is None:
        ap.error("--bootstrap-port is required for --role prefill")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    settings = FakeSettings(
        role=args.role, model_path=args.model_path or tempfile.gettempdir(),
        served_model_name=args.served_model_name, num_tokens=args.num_tokens, token_delay_s=args.token_delay,
        prefill_delay_s=args.prefill_delay, reply=args.reply, incremental=args.incremental,
    )
    worker = FakeWorker(settings, args.host, args.bootstrap_port)
    import uvicorn

    t0 = time.monotonic()
    uvicorn.run(worker, host=args.host, port=args.port, loop="uvloop", http="httptools", access_log=False,
                log_level=args.log_level, server_header=False, date_header=False, timeout_keep_alive=60,
                proxy_headers=False)
    logger.info("fake worker ran %.1fs", time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
