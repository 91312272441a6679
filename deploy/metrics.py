"""The fleet controller's own metrics and its Prometheus service-discovery file.

Metrics (created per controller against an injected registry)::

    pdserve:fleet_workers{role, state}          gauge   workers per lifecycle state
    pdserve:fleet_workers_desired{role}         gauge   replicas asked for
    pdserve:fleet_worker_restarts_total{role}   counter actor restarts observed (new incarnation)
    pdserve:fleet_registrations_total{role, op} counter router registrations (op=add|remove)
    pdserve:fleet_drain_seconds{role}           histogram time a removed worker took to drain
    pdserve:fleet_router_up                     gauge   1 when the router answers /health

The service-discovery file is Prometheus ``file_sd`` JSON: one target group per role (router,
prefill, decode, controller) with labels ``role`` and ``fleet``; it is rewritten atomically
whenever membership changes, so a Prometheus on the head node follows scale-ups and restarts.
It lists every worker the fleet wants, healthy or not (a dead worker scrapes as ``up == 0``
until it is back or replaced); a worker being removed by ``scale`` leaves it at once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger(__name__)

WORKER_STATES = ("starting", "healthy", "unhealthy", "restarting", "draining", "failed")
FLEET_ROLES = ("prefill", "decode")


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.workers = Gauge(
            "pdserve:fleet_workers", "Workers per lifecycle state", ["role", "state"], registry=registry
        )
        self.desired = Gauge(
            "pdserve:fleet_workers_desired", "Replicas asked for", ["role"], registry=registry
        )
        self.restarts = Counter(
            "pdserve:fleet_worker_restarts", "Worker actor restarts observed", ["role"], registry=registry
        )
        self.registrations = Counter(
            "pdserve:fleet_registrations", "Router registrations", ["role", "op"], registry=registry
        )
        self.drain = Histogram(
            "pdserve:fleet_drain_seconds",
            "Time a removed worker took to drain its in-flight requests",
            ["role"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.router_up = Gauge(
            "pdserve:fleet_router_up", "1 when the router answers /health", registry=registry
        )
        for role in FLEET_ROLES:
            self.restarts.labels(role=role)
            for op in ("add", "remove"):
                self.registrations.labels(role=role, op=op)
            for state in WORKER_STATES:
                self.workers.labels(role=role, state=state).set(0)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set_states(self, counts: Mapping[tuple[str, str], int]) -> None:
        for role in FLEET_ROLES:
            for state in WORKER_STATES:
                self.workers.labels(role=role, state=state).set(counts.get((role, state), 0))

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``host:port`` (0 = a free port) on a daemon thread; returns the
        port. Always the classic text format, like the router and workers: prometheus_client's
        own server would negotiate OpenMetrics, which rewrites the ``:`` in our names to ``_``."""
        server = make_server(host, port, self._wsgi, _ThreadingWSGIServer, handler_class=_QuietHandler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fleet-metrics", daemon=True)
        self._thread.start()
        return int(server.server_port)

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        body = generate_latest(self.registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]

    def close(self, timeout_s: float = 5.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self._server = self._thread = None


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def _hostport(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def sd_groups(fleet: str, targets: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """``(role, url)`` pairs -> file_sd target groups, one per role, sorted for stable output."""
    by_role: dict[str, list[str]] = {}
    for role, url in targets:
        by_role.setdefault(role, []).append(_hostport(url))
    return [
        {"targets": sorted(set(hosts)), "labels": {"role": role, "fleet": fleet}}
        for role, hosts in sorted(by_role.items())
    ]


def write_sd_file(path: str | os.PathLike[str], groups: list[dict[str, Any]]) -> None:
    """Atomically replace ``path`` with ``groups`` (Prometheus re-reads it on change)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sd-", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(groups, fh, indent=1)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
