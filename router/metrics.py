"""Prometheus metrics of one router instance (created against an injected CollectorRegistry).

Names follow ``pdserve:router_<thing>_<unit>``; labels are low-cardinality (route, outcome, mode,
reason, and the worker URL for per-worker series -- bounded by the fleet size).

Hot-path metrics (updated on every request) are plain Python numbers exported by a collector at
scrape time: about nine prometheus_client ``inc``/``observe`` calls per request, each taking a
lock, cost more CPU than the rest of the routing decision. The router is event-loop confined, so
no lock is needed; a scrape reads a consistent-enough snapshot. Rare events (breaker transitions,
health changes, retries, leg failures) use ordinary prometheus_client metrics.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from pdserve.router.breaker import BreakerState
from pdserve.router.retry import FAILURE_KINDS

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

OUTCOMES = ("success", "client_error", "upstream_error", "no_worker", "cancelled", "rejected")
ROUTES = ("generate", "chat", "completions")
MODES = ("pd", "local", "colocated")


class FastHistogram:
    """Bucket counts without locks (observe = one bisect and three additions)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append((repr(float(bound)), float(acc)))
        out.append(("+Inf", float(self.count)))
        return out


class _HotCollector:
    def __init__(self, m: RouterMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        req = CounterMetricFamily("pdserve:router_requests", "Requests by route and outcome",
                                  labels=["route", "outcome"])
        for (route, outcome), n in m.requests.items():
            req.add_metric([route, outcome], n)
        yield req
        dec = CounterMetricFamily(
            "pdserve:router_routing_decisions",
            "Routing decisions: pd = remote prefill, local = prefill on the decode worker "
            "(conditional disaggregation), colocated = a 'both' worker", labels=["mode"])
        for mode, n in m.decisions.items():
            dec.add_metric([mode], n)
        yield dec
        pre = CounterMetricFamily("pdserve:router_prefix_cache_lookups",
                                  "Prefix-index lookups of the chosen worker", labels=["result"])
        pre.add_metric(["hit"], m.prefix_hits)
        pre.add_metric(["miss"], m.prefix_misses)
        yield pre
        yield CounterMetricFamily("pdserve:router_prefix_cached_tokens",
                                  "Prompt tokens found cached on the chosen worker", value=m.cached_tokens)
        yield CounterMetricFamily("pdserve:router_prompt_tokens", "Prompt tokens routed",
                                  value=m.prompt_tokens)
        yield GaugeMetricFamily("pdserve:router_inflight_requests", "Requests in flight in the router",
                                value=m.inflight)
        for name, doc, hists in (
            ("pdserve:router_ttft_seconds", "Time to first streamed chunk, as the router sees it", m.ttft),
            ("pdserve:router_e2e_latency_seconds", "Request latency from arrival to the last byte", m.e2e),
        ):
            fam = HistogramMetricFamily(name, doc, labels=["mode"])
            for mode, h in hists.items():
                fam.add_metric([mode], h.buckets(), h.sum)
            yield fam
        itl = HistogramMetricFamily("pdserve:router_inter_token_latency_seconds",
                                    "Gap between consecutive streamed chunks")
        itl.add_metric([], m.itl.buckets(), m.itl.sum)
        yield itl


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # hot path: plain numbers
        self.requests = {(r, o): 0 for r in ROUTES for o in OUTCOMES}
        self.decisions = dict.fromkeys(MODES, 0)
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.cached_tokens = 0
        self.prompt_tokens = 0
        self.inflight = 0
        self.ttft = {m: FastHistogram(LATENCY_BUCKETS) for m in MODES}
        self.e2e = {m: FastHistogram(LATENCY_BUCKETS) for m in MODES}
        self.itl = FastHistogram(ITL_BUCKETS)
        registry.register(_HotCollector(self))
        # rare events and per-worker state
        self.worker_inflight = Gauge(
            "pdserve:router_worker_inflight_requests",
            "Router-tracked requests in flight per worker (sampled)",
            ["worker", "role"], registry=registry,
        )
        self.worker_queued_tokens = Gauge(
            "pdserve:router_worker_queued_prefill_tokens", "Prefill tokens queued per worker (sampled)",
            ["worker", "role"], registry=registry,
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
        # rare-event counters start at 0 for every known label value, so dashboards and alert
        # rules see a series (not "no data") on a healthy router
        for state in BreakerState:
            self.breaker_transitions.labels(state.name.lower())
        for kind in FAILURE_KINDS:
            self.retries.labels(kind)
            for leg in ("prefill", "decode", "colocated"):
                self.leg_failures.labels(leg, kind)
        self.worker_healthy = Gauge(
            "pdserve:router_worker_healthy", "1 if the worker passes health checks", ["worker", "role"],
            registry=registry,
        )
        self.workers = Gauge(
            "pdserve:router_workers", "Registered workers by role", ["role"], registry=registry,
        )

    # ---- hot path ----------------------------------------------------------------------------
    def request(self, route: str, outcome: str) -> None:
        self.requests[(route, outcome)] += 1

    def observe_ttft(self, mode: str, seconds: float) -> None:
        self.ttft[mode].observe(seconds)

    def observe_e2e(self, mode: str, seconds: float) -> None:
        self.e2e[mode].observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def decision(self, mode: str, num_tokens: int, matched: int) -> None:
        self.decisions[mode] += 1
        self.prompt_tokens += num_tokens
        if matched > 0:
            self.prefix_hits += 1
            self.cached_tokens += matched
        else:
            self.prefix_misses += 1

    # ---- rare events -------------------------------------------------------------------------
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
