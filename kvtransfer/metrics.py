"""Prometheus metrics of one transfer service, created against an injected registry.

=========================================  =========  ===================================
name                                       type       labels
=========================================  =========  ===================================
``pdserve:kv_transfer_info``               gauge (1)  side, transport
``pdserve:kv_transfer_bytes_total``        counter    side, transport
``pdserve:kv_transfer_duration_seconds``   histogram  side, transport
``pdserve:kv_transfer_failures_total``     counter    side, transport, phase, reason
``pdserve:kv_transfer_rooms``              gauge      side, state
``pdserve:kv_transfer_pages_held``         gauge      side
``pdserve:kv_transfer_protocol_errors_total`` counter side (garbage dropped off the wire)
=========================================  =========  ===================================

Durations are measured per room from the first page moved to verified arrival (not from
registration, which includes the prefill forward), so GB/s derived from them is the transport's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.kvtransfer.states import KVPoll

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry, *, side: str, transport: str) -> None:
        self.side = side
        self.transport = transport
        info = Gauge(
            "pdserve:kv_transfer_info",
            "The transport this service runs (always 1)",
            ["side", "transport"],
            registry=registry,
        )
        info.labels(side, transport).set(1)
        self._bytes = Counter(
            "pdserve:kv_transfer_bytes", "KV bytes moved", ["side", "transport"], registry=registry
        ).labels(side, transport)
        self._duration = Histogram(
            "pdserve:kv_transfer_duration_seconds",
            "Per-room transfer time, first page to verified",
            ["side", "transport"],
            buckets=_BUCKETS,
            registry=registry,
        ).labels(side, transport)
        self._failures = Counter(
            "pdserve:kv_transfer_failures",
            "Failed rooms",
            ["side", "transport", "phase", "reason"],
            registry=registry,
        )
        rooms = Gauge("pdserve:kv_transfer_rooms", "Rooms by state", ["side", "state"], registry=registry)
        self._rooms = {state: rooms.labels(side, state.name) for state in KVPoll}
        self._pages = Gauge(
            "pdserve:kv_transfer_pages_held",
            "KV pages referenced by unfinished rooms",
            ["side"],
            registry=registry,
        ).labels(side)
        self._protocol = Counter(
            "pdserve:kv_transfer_protocol_errors",
            "Malformed messages or frames dropped",
            ["side"],
            registry=registry,
        ).labels(side)

    def on_state(self, old: KVPoll | None, new: KVPoll) -> None:
        """A room moved ``old -> new`` (``old`` None: created). Terminal rooms are not counted."""
        if old is not None and not old.terminal:
            self._rooms[old].dec()
        if not new.terminal:
            self._rooms[new].inc()

    def room_done(self, nbytes: int, seconds: float) -> None:
        self._bytes.inc(nbytes)
        self._duration.observe(seconds)

    def room_failed(self, phase: str, reason: str) -> None:
        self._failures.labels(self.side, self.transport, phase, reason).inc()

    def pages(self, delta: int) -> None:
        self._pages.inc(delta)

    def protocol_error(self) -> None:
        self._protocol.inc()
