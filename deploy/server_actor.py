"""A Ray actor that serves one ASGI app (a worker or the router) with uvicorn in its own thread.

Lifecycle:

1. ``__init__`` imports the app factory (``"module:function"``), binds the HTTP socket
   (``port`` 0 = a free port), picks the bootstrap port for a prefill worker, calls
   ``factory(host=, port=, role=, [bootstrap_port=,] **kwargs)``, and starts uvicorn on a daemon
   thread with its own event loop. It returns once the server has started (lifespan included) or
   raises :class:`~pdserve.errors.WorkerError` when startup fails or exceeds ``startup_s``; the
   socket and thread are released on every failure path.
2. :meth:`ServerActor.info` reports where it serves and its ``incarnation`` (new on every start).
3. :meth:`ServerActor.in_flight` counts HTTP requests being served (probes excluded), which is
   what draining waits on.
4. :meth:`ServerActor.shutdown` stops accepting, lets in-flight requests finish for up to
   ``timeout_s`` and joins the thread.

After a crash Ray re-runs ``__init__`` (same arguments, new process): a new port and a new
incarnation, which the controller notices and re-registers with the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pdserve.api.asgi import ASGIApp, Receive, Scope, Send
from pdserve.errors import ConfigError, WorkerError

logger = logging.getLogger(__name__)


# Probe paths that do not count as in-flight work.
PROBE_PATHS = frozenset({"/health", "/get_load", "/load", "/metrics", "/get_server_info", "/workers"})


class ServerSpec(BaseModel):
    """What one actor serves. Pickled into the actor; Ray replays it on restart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: str
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    bootstrap_port: int | None = Field(default=None, description="None: no bootstrap port; 0: a free one")
    startup_s: float = 600.0
    graceful_s: float = 15.0


class _InFlight:
    """ASGI wrapper counting HTTP requests in progress (probe paths excluded)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1


def import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"app factory {spec!r}: cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"app factory {spec!r}: {module_name} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def free_port(host: str) -> int:
    """A port that was free a moment ago (for servers that bind by themselves)."""
    sock = bind_socket(host, 0)
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


class ServerActor:
    """Runs ``spec``'s app. Used as a Ray actor class (``ray.remote(ServerActor)``) and, in unit
    tests, as a plain object."""

    def __init__(self, spec: ServerSpec) -> None:
        import uvicorn

        self.spec = spec
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self._error: BaseException | None = None
        factory = import_factory(spec.factory)
        self._sock = bind_socket(spec.host, spec.port)
        try:
            self.port = int(self._sock.getsockname()[1])
            self.bootstrap_port: int | None = None
            if spec.bootstrap_port is not None:
                self.bootstrap_port = spec.bootstrap_port or free_port(spec.host)
            extra = {"bootstrap_port": self.bootstrap_port} if self.bootstrap_port is not None else {}
            app = factory(host=spec.host, port=self.port, role=spec.role, **extra, **spec.kwargs)
            self._app = _InFlight(app)
            config = uvicorn.Config(
                self._app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=max(1, int(spec.graceful_s)),
                timeout_keep_alive=30,
            )
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._serve, name=f"uvicorn-{spec.name}", daemon=True)
            self._thread.start()
            self._wait_started(spec.startup_s)
        except BaseException:
            self._sock.close()
            raise
        logger.info("%s (%s) serving on %s, incarnation %s", spec.name, spec.role, self.url, self.incarnation)

    # -- lifecycle ---------------------------------------------------------------------------

    def _serve(self) -> None:
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:  # reported by _wait_started / info
            self._error = exc
            logger.exception("%s: server thread failed", self.spec.name)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                reason = repr(self._error) if self._error else "the app's startup failed (see its log)"
                raise WorkerError(f"{self.spec.name}: server exited during startup: {reason}")
            if time.monotonic() > deadline:
                self._stop(timeout_s=5.0)
                raise WorkerError(f"{self.spec.name}: server not started within {timeout_s:.0f} s")
            time.sleep(0.02)

    def _stop(self, timeout_s: float) -> bool:
        self._server.should_exit = True
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=2.0)
        self._sock.close()
        return not self._thread.is_alive()

    # -- actor methods -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = self.spec.host
        if host in {"0.0.0.0", "::"}:
            host = _node_ip()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def info(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "role": self.spec.role,
            "url": self.url,
            "host": self.spec.host,
            "port": self.port,
            "bootstrap_port": self.bootstrap_port,
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "incarnation": self.incarnation,
            "started_at": self.started_at,
            "serving": self._thread.is_alive() and self._server.started,
        }

    def in_flight(self) -> int:
        return self._app.count

    def shutdown(self, timeout_s: float = 15.0) -> bool:
        """Stop serving; True when the server thread ended within the timeout."""
        logger.info("%s: shutting down (in flight: %d)", self.spec.name, self._app.count)
        return self._stop(timeout_s)


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except Exception:  # pragma: no cover - outside Ray
        pass
    return "127.0.0.1"
