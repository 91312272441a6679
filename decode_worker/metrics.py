"""The worker's own Prometheus metrics (``pdserve:worker_*``), created per app against the app's
registry (the engine's ``pdserve:engine_*`` and kvtransfer's ``pdserve:kv_transfer_*`` families
are registered into the same registry by their owners).

=================================================  =========  ============================
name                                               type       labels
=================================================  =========  ============================
``pdserve:worker_info``                            gauge (1)  role, transport, model
``pdserve:worker_requests_total``                  counter    leg, outcome
``pdserve:worker_http_responses_total``            counter    path, code (``2xx``...)
``pdserve:worker_ttft_seconds``                    histogram  leg
``pdserve:worker_inter_token_latency_seconds``     histogram  leg
``pdserve:worker_e2e_latency_seconds``             histogram  leg
``pdserve:worker_prompt_tokens_total``             counter    leg
``pdserve:worker_generation_tokens_total``         counter    leg
``pdserve:worker_kv_transfer_seconds``             histogram  leg (prefill|decode)
``pdserve:worker_kv_transfer_bytes_total``         counter    leg
``pdserve:worker_kv_transfer_failures_total``      counter    leg, reason
``pdserve:worker_queue_depth``                     gauge      queue
``pdserve:worker_kv_blocks``                       gauge      state (free|used|cached|held|total)
``pdserve:worker_kv_usage_ratio``                  gauge      -
=================================================  =========  ============================

``leg`` is ``prefill``/``decode`` (a PD leg) or ``local`` (colocated, or a decode worker
prefilling a short prompt itself). The transfer time is measured by the worker around the
whole rendezvous (decode: reserve -> pages verified; prefill: prompt computed -> decode
confirmed); kvtransfer's own histogram measures the wire time only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.api.asgi import ASGIApp, Message, Receive, Scope, Send
from pdserve.engine.outputs import RequestOutput

LEGS = ("prefill", "decode", "local")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_TRANSFER = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KNOWN_PATHS = frozenset(
    {
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/health_generate",
        "/get_load",
        "/load",
        "/get_model_info",
        "/model_info",
        "/get_server_info",
        "/server_info",
        "/version",
        "/metrics",
        "/abort_request",
    }
)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, *, role: str, transport: str, model: str) -> None:
        self.registry = registry
        Gauge(
            "pdserve:worker_info", "This worker's role and KV transport (always 1)",
            ["role", "transport", "model"], registry=registry,
        ).labels(role, transport, model).set(1)  # fmt: skip
        self.requests = Counter(
            "pdserve:worker_requests", "Generation requests by leg and outcome", ["leg", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.http = Counter(
            "pdserve:worker_http_responses", "HTTP responses by path and status class", ["path", "code"],
            registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "pdserve:worker_ttft_seconds", "Request arrival to first output", ["leg"], buckets=_LATENCY,
            registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "pdserve:worker_inter_token_latency_seconds", "Gap between two outputs of a request", ["leg"],
            buckets=_ITL, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "pdserve:worker_e2e_latency_seconds", "Request arrival to its last output", ["leg"],
            buckets=_LATENCY, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "pdserve:worker_prompt_tokens", "Prompt tokens of finished requests", ["leg"], registry=registry
        )
        self.generation_tokens = Counter(
            "pdserve:worker_generation_tokens", "Tokens streamed to clients", ["leg"], registry=registry
        )
        self.transfer_seconds = Histogram(
            "pdserve:worker_kv_transfer_seconds", "KV rendezvous + transfer time seen by the worker",
            ["leg"], buckets=_TRANSFER, registry=registry,
        )  # fmt: skip
        self.transfer_bytes = Counter(
            "pdserve:worker_kv_transfer_bytes", "KV bytes moved for this worker's requests", ["leg"],
            registry=registry,
        )  # fmt: skip
        self.transfer_failures = Counter(
            "pdserve:worker_kv_transfer_failures", "PD requests whose KV transfer failed",
            ["leg", "reason"], registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "pdserve:worker_queue_depth", "Requests per queue (sampled at scrape)", ["queue"],
            registry=registry,
        )  # fmt: skip
        self.kv_blocks = Gauge(
            "pdserve:worker_kv_blocks", "KV blocks by state (sampled at scrape)", ["state"],
            registry=registry,
        )  # fmt: skip
        self.kv_usage = Gauge(
            "pdserve:worker_kv_usage_ratio", "Fraction of KV blocks not allocatable now", registry=registry
        )
        for leg in LEGS:  # export zeros from the start, so dashboards see every series
            self.ttft.labels(leg)
            self.e2e.labels(leg)
            self.requests.labels(leg, "ok")

    def watch_gauges(self, sample: Callable[[], dict[str, Any]]) -> None:
        """Bind the queue/KV gauges to ``sample()`` (a :meth:`WorkerState.load_report`-like dict)."""

        def field(name: str) -> Callable[[], float]:
            return lambda: float(sample().get(name, 0))

        for queue, key in (
            ("engine_waiting", "engine_waiting_reqs"),
            ("engine_running", "num_running_reqs"),
            ("awaiting_decode", "awaiting_decode_reqs"),
            ("awaiting_kv", "awaiting_kv_reqs"),
            ("transferring", "transferring_reqs"),
        ):
            self.queue_depth.labels(queue).set_function(field(key))
        for state, key in (
            ("free", "free_kv_blocks"),
            ("used", "used_kv_blocks"),
            ("cached", "cached_kv_blocks"),
            ("held", "held_kv_blocks"),
            ("total", "total_kv_blocks"),
        ):
            self.kv_blocks.labels(state).set_function(field(key))
        self.kv_usage.set_function(field("kv_usage"))

    def request(self, leg: str) -> RequestTimer:
        return RequestTimer(self, leg)


class RequestTimer:
    """Latency bookkeeping of one request (TTFT, inter-token gaps, e2e, token counts)."""

    __slots__ = ("_first", "_last", "_m", "_start", "leg", "tokens")

    def __init__(self, metrics: WorkerMetrics, leg: str) -> None:
        self._m = metrics
        self.leg = leg
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last = self._start
        self.tokens = 0

    def output(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self._m.ttft.labels(self.leg).observe(now - self._start)
        elif out.new_token_ids:
            self._m.itl.labels(self.leg).observe(now - self._last)
        self._last = now
        self.tokens += len(out.new_token_ids)

    def done(self, outcome: str, prompt_tokens: int) -> None:
        m, leg = self._m, self.leg
        m.requests.labels(leg, outcome).inc()
        if outcome == "ok":
            m.e2e.labels(leg).observe(time.perf_counter() - self._start)
            m.prompt_tokens.labels(leg).inc(prompt_tokens)
        if self.tokens:
            m.generation_tokens.labels(leg).inc(self.tokens)


class HttpMetricsMiddleware:
    """Pure ASGI: counts every HTTP response by (known) path and status class."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], WorkerMetrics | None]) -> None:
        self.app = app
        self.metrics = metrics  # None while the app is not started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics = self.metrics()
                if metrics is not None:
                    metrics.http.labels(label, f"{int(message['status']) // 100}xx").inc()
            await send(message)

        await self.app(scope, receive, counting_send)
