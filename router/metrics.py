"""Prometheus metrics of one router instance (created against an injected CollectorRegistry).

Names follow ``pdserve:router_<thing>_<unit>``; labels are low-cardinality (route, outcome, mode,
reason, and the worker URL for per-worker gauges -- bounded by the fleet size).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.router.breaker import BreakerState

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

OUTCOMES = ("success", "client_error", "upstream_error", "no_worker", "cancelled", "rejected")
ROUTES = ("generate", "chat", "completions")
MODES = ("pd", "local", "colocated")


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "pdserve:router_requests_total", "Requests by route and outcome",
            ["route", "outcome"], registry=registry,
        )
        self.ttft = Histogram(
            "pdserve:router_ttft_seconds", "Time to first streamed chunk, as the router sees it",
            ["mode"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.itl = Histogram(
            "pdserve:router_inter_token_latency_seconds", "Gap between consecutive streamed chunks",
            buckets=_ITL_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "pdserve:router_e2e_latency_seconds", "Request latency from arrival to the last byte",
            ["mode"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.inflight = Gauge(
            "pdserve:router_inflight_requests", "Requests in flight in the router", registry=registry,
        )
        self.worker_inflight = Gauge(
            "pdserve:router_worker_inflight_requests", "Router-tracked requests in flight per worker",
            ["worker", "role"], registry=registry,
        )
        self.worker_queued_tokens = Gauge(
            "pdserve:router_worker_queued_prefill_tokens", "Prefill tokens queued per worker (reported)",
            ["worker", "role"], registry=registry,
        )
        self.decisions = Counter(
            "pdserve:router_routing_decisions_total",
            "Routing decisions: pd = remote prefill, local = prefill on the decode worker "
            "(conditional disaggregation), colocated = a 'both' worker",
            ["mode"], registry=registry,
        )
        self.prefix = Counter(
            "pdserve:router_prefix_cache_lookups_total", "Prefix-index lookups of the chosen worker",
            ["result"], registry=registry,
        )
        self.prefix_tokens = Counter(
            "pdserve:router_prefix_cached_tokens_total", "Prompt tokens found cached on the chosen worker",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "pdserve:router_prompt_tokens_total", "Prompt tokens routed", registry=registry,
        )
        self.retries = Counter(
            "pdserve:router_retries_total", "Attempts retried on a new pair", ["reason"], registry=registry,
        )
        self.leg_failures = Counter(
            "pdserve:router_leg_failures_total", "Failed legs", ["leg", "kind"], registry=registry,
        )
        self.cancelled_legs = Counter(
            "pdserve:router_cancelled_legs_total",
            "Legs cancelled because the other leg or the client failed",
            ["leg", "cause"], registry=registry,
        )
        self.breaker_state = Gauge(
            "pdserve:router_worker_breaker_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            ["worker", "role"], registry=registry,
        )
        self.breaker_transitions = Counter(
            "pdserve:router_breaker_transitions_total", "Breaker transitions by target state",
            ["state"], registry=registry,
        )
        self.worker_healthy = Gauge(
            "pdserve:router_worker_healthy", "1 if the worker passes health checks", ["worker", "role"],
            registry=registry,
        )
        self.workers = Gauge(
            "pdserve:router_workers", "Registered workers by role", ["role"], registry=registry,
        )
        # Pre-resolved children for the hot path.
        self._req = {(r, o): self.requests.labels(r, o) for r in ROUTES for o in OUTCOMES}
        self._ttft = {m: self.ttft.labels(m) for m in MODES}
        self._e2e = {m: self.e2e.labels(m) for m in MODES}
        self._decision = {m: self.decisions.labels(m) for m in MODES}
        self._hit = self.prefix.labels("hit")
        self._miss = self.prefix.labels("miss")

    def request(self, route: str, outcome: str) -> None:
        self._req[(route, outcome)].inc()

    def observe_ttft(self, mode: str, seconds: float) -> None:
        self._ttft[mode].observe(seconds)

    def observe_e2e(self, mode: str, seconds: float) -> None:
        self._e2e[mode].observe(seconds)

    def decision(self, mode: str, num_tokens: int, matched: int) -> None:
        self._decision[mode].inc()
        self.prompt_tokens.inc(num_tokens)
        if matched > 0:
            self._hit.inc()
            self.prefix_tokens.inc(matched)
        else:
            self._miss.inc()

    def breaker(self, url: str, role: str, state: BreakerState) -> None:
        self.breaker_state.labels(url, role).set(int(state))
        self.breaker_transitions.labels(state.name.lower()).inc()

    def worker_added(self, url: str, role: str) -> None:
        self.worker_healthy.labels(url, role).set(1)
        self.breaker_state.labels(url, role).set(0)
        self.worker_inflight.labels(url, role).set(0)

    def worker_removed(self, url: str, role: str) -> None:
        for g in (self.worker_healthy, self.breaker_state, self.worker_inflight, self.worker_queued_tokens):
            with contextlib.suppress(KeyError):
                g.remove(url, role)

    def set_worker_counts(self, prefill: int, decode: int, both: int) -> None:
        self.workers.labels("prefill").set(prefill)
        self.workers.labels("decode").set(decode)
        self.workers.labels("both").set(both)
