"""The router's worker table: per-worker health, breaker, load, in-flight accounting, prefix index.

Lifecycle of a worker entry:

1. Added from the config or ``POST /workers`` (healthy until the health loop says otherwise).
2. Routable while healthy, its breaker admits requests, and it has not been removed.
3. The health loop flips ``healthy`` after ``failure_threshold`` consecutive failed probes and back
   after ``success_threshold`` good ones; the load loop refreshes :class:`LoadReport`.
4. ``DELETE /workers`` removes it from routing at once; requests already on it finish normally.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pdserve.router.breaker import BreakerState, CircuitBreaker
from pdserve.router.config import RouterConfig, WorkerRole, WorkerSpec
from pdserve.router.errors import WorkerConflictError, WorkerNotFoundError
from pdserve.router.prefix_index import PrefixIndex


@dataclass(slots=True)
class LoadReport:
    """One ``/get_load`` answer, summed over the worker's data-parallel ranks."""

    num_waiting_reqs: int = 0
    num_running_reqs: int = 0
    waiting_prefill_tokens: int = 0
    free_kv_blocks: int | None = None
    total_kv_blocks: int | None = None
    received_at: float = 0.0


def _num(d: dict[str, Any], *names: str) -> int | None:
    for n in names:
        v = d.get(n)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return int(v)
    return None


def parse_load(payload: Any, now: float) -> LoadReport:
    """Accept SGLang's shape (a list of per-DP-rank dicts with ``num_reqs``, ``num_waiting_reqs``,
    ``num_tokens``), a single dict, or ``{"loads": [...]}``; unknown keys are ignored."""
    if isinstance(payload, dict) and isinstance(payload.get("loads"), list):
        payload = payload["loads"]
    entries = payload if isinstance(payload, list) else [payload]
    rep = LoadReport(received_at=now)
    free_total: list[int] = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        waiting = _num(e, "num_waiting_reqs") or 0
        running = _num(e, "num_running_reqs")
        if running is None:  # SGLang: num_reqs counts running + waiting
            running = max(0, (_num(e, "num_reqs") or 0) - waiting)
        rep.num_waiting_reqs += waiting
        rep.num_running_reqs += running
        rep.waiting_prefill_tokens += _num(e, "waiting_prefill_tokens", "num_waiting_tokens") or 0
        free, total = _num(e, "free_kv_blocks"), _num(e, "total_kv_blocks")
        if free is not None and total is not None and total > 0:
            free_total.append(free)
            free_total.append(total)
    if free_total:
        rep.free_kv_blocks = sum(free_total[0::2])
        rep.total_kv_blocks = sum(free_total[1::2])
    return rep


class Worker:
    """Mutable routing state of one worker (event-loop confined: no locking)."""

    __slots__ = (
        "addr",
        "bootstrap_host",
        "bootstrap_port",
        "breaker",
        "health_fails",
        "health_oks",
        "healthy",
        "index",
        "inflight_prefill_tokens",
        "inflight_requests",
        "load",
        "removed",
        "role",
        "url",
    )

    def __init__(self, spec: WorkerSpec, breaker: CircuitBreaker, index: PrefixIndex) -> None:
        parts = urlsplit(spec.url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        self.url = spec.url
        self.role: WorkerRole = spec.role
        self.addr = (host, port)
        self.bootstrap_host = host
        self.bootstrap_port = spec.bootstrap_port
        self.breaker = breaker
        self.index = index
        self.healthy = True
        self.health_fails = 0
        self.health_oks = 0
        self.load = LoadReport()
        self.inflight_requests = 0
        self.inflight_prefill_tokens = 0
        self.removed = False

    def routable(self) -> bool:
        return self.healthy and not self.removed and self.breaker.available()

    def fresh_load(self, now: float, stale_after_s: float) -> LoadReport | None:
        rep = self.load
        if rep.received_at == 0.0 or now - rep.received_at > stale_after_s:
            return None
        return rep

    def describe(self) -> dict[str, Any]:
        rep = self.load
        return {
            "url": self.url,
            "role": self.role,
            "bootstrap_port": self.bootstrap_port,
            "healthy": self.healthy,
            "breaker": self.breaker.state.name.lower(),
            "inflight_requests": self.inflight_requests,
            "inflight_prefill_tokens": self.inflight_prefill_tokens,
            "prefix_index_blocks": len(self.index),
            "load": {
                "num_waiting_reqs": rep.num_waiting_reqs,
                "num_running_reqs": rep.num_running_reqs,
                "waiting_prefill_tokens": rep.waiting_prefill_tokens,
                "free_kv_blocks": rep.free_kv_blocks,
                "total_kv_blocks": rep.total_kv_blocks,
                "age_s": None if rep.received_at == 0.0 else round(time.monotonic() - rep.received_at, 3),
            },
        }


class WorkerRegistry:
    """All workers by URL, plus per-role lists kept ready for the routing hot path.

    Starts empty: the owner adds ``cfg.workers`` once its callbacks are ready."""

    def __init__(
        self,
        cfg: RouterConfig,
        *,
        on_breaker_change: Callable[[Worker, BreakerState], None] | None = None,
        on_membership_change: Callable[[Worker, bool], None] | None = None,
    ) -> None:
        self._cfg = cfg
        self._on_breaker_change = on_breaker_change
        self._on_membership_change = on_membership_change
        self._by_url: dict[str, Worker] = {}
        self.prefill: list[Worker] = []
        self.decode: list[Worker] = []
        self.both: list[Worker] = []

    def __len__(self) -> int:
        return len(self._by_url)

    def all(self) -> list[Worker]:
        return list(self._by_url.values())

    def get(self, url: str) -> Worker | None:
        return self._by_url.get(url)

    def add(self, spec: WorkerSpec) -> Worker:
        if spec.url in self._by_url:
            raise WorkerConflictError(f"worker {spec.url} is already registered", param="url")
        holder: list[Worker] = []

        def changed(state: BreakerState) -> None:
            if holder and self._on_breaker_change is not None:
                self._on_breaker_change(holder[0], state)

        worker = Worker(
            spec,
            CircuitBreaker(self._cfg.breaker, on_change=changed),
            PrefixIndex(self._cfg.policy.index_max_blocks),
        )
        holder.append(worker)
        self._by_url[spec.url] = worker
        self._rebuild()
        if self._on_membership_change is not None:
            self._on_membership_change(worker, True)
        return worker

    def remove(self, url: str) -> Worker:
        worker = self._by_url.pop(url, None)
        if worker is None:
            raise WorkerNotFoundError(f"worker {url} is not registered", param="url")
        worker.removed = True
        worker.index.clear()
        self._rebuild()
        if self._on_membership_change is not None:
            self._on_membership_change(worker, False)
        return worker

    def _rebuild(self) -> None:
        ws = list(self._by_url.values())
        self.prefill = [w for w in ws if w.role == "prefill"]
        self.decode = [w for w in ws if w.role == "decode"]
        self.both = [w for w in ws if w.role == "both"]
