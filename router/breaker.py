"""Per-worker circuit breaker.

Lifecycle:

1. CLOSED: requests flow. Each failure (connection error, timeout, 5xx) counts; failures older than
   ``window_s`` are forgotten, a success resets the count. ``failure_threshold`` failures within
   the window open the breaker.
2. OPEN: the worker gets no new requests for ``open_timeout_s`` seconds.
3. HALF_OPEN: after the timeout, up to ``half_open_max_trials`` trial requests are let through at
   once. ``success_threshold`` successes close the breaker; any failure reopens it (and restarts
   the timeout).

The clock is injectable so the state machine is tested without sleeping.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from pdserve.router.config import BreakerConfig


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_failures",
        "_last_failure",
        "_on_change",
        "_opened_at",
        "_successes",
        "_trials",
        "cfg",
        "state",
    )

    def __init__(
        self,
        cfg: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.state = BreakerState.CLOSED
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._last_failure = 0.0
        self._opened_at = 0.0
        self._successes = 0
        self._trials = 0

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def available(self) -> bool:
        """Whether a new request may be sent now (moves OPEN -> HALF_OPEN when the timeout is up)."""
        if not self.cfg.enabled:
            return True
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.cfg.open_timeout_s:
                return False
            self._trials = 0
            self._successes = 0
            self._set(BreakerState.HALF_OPEN)
        return self._trials < self.cfg.half_open_max_trials

    def on_dispatch(self) -> None:
        """A request was sent to this worker (uses up a trial slot while half-open)."""
        if self.state is BreakerState.HALF_OPEN:
            self._trials += 1

    def record_success(self) -> None:
        if not self.cfg.enabled:
            return
        if self.state is BreakerState.HALF_OPEN:
            self._trials = max(0, self._trials - 1)
            self._successes += 1
            if self._successes >= self.cfg.success_threshold:
                self._failures = 0
                self._set(BreakerState.CLOSED)
        elif self.state is BreakerState.CLOSED:
            self._failures = 0

    def record_failure(self) -> None:
        if not self.cfg.enabled:
            return
        now = self._clock()
        if self.state is BreakerState.HALF_OPEN:
            self._trials = max(0, self._trials - 1)
            self._open(now)
            return
        if self.state is BreakerState.OPEN:
            return
        if now - self._last_failure > self.cfg.window_s:
            self._failures = 0
        self._failures += 1
        self._last_failure = now
        if self._failures >= self.cfg.failure_threshold:
            self._open(now)

    def record_cancelled(self) -> None:
        """A request ended with neither verdict (e.g. the client left): free its trial slot."""
        if self.state is BreakerState.HALF_OPEN:
            self._trials = max(0, self._trials - 1)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._successes = 0
        self._set(BreakerState.OPEN)

    def reset(self) -> None:
        self._failures = 0
        self._successes = 0
        self._trials = 0
        self._set(BreakerState.CLOSED)
