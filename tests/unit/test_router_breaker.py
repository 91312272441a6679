"""Circuit breaker state machine (closed -> open -> half-open -> closed/open), on a fake clock."""

from __future__ import annotations

import pytest

from pdserve.router.breaker import BreakerState, CircuitBreaker
from pdserve.router.config import BreakerConfig

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(**kw: object) -> tuple[CircuitBreaker, Clock, list[BreakerState]]:
    clock = Clock()
    changes: list[BreakerState] = []
    cfg = BreakerConfig(**{"failure_threshold": 3, "success_threshold": 2, "open_timeout_s": 5.0,
                           "window_s": 10.0, **kw})  # type: ignore[arg-type]
    return CircuitBreaker(cfg, clock=clock, on_change=changes.append), clock, changes


def test_opens_after_threshold_and_success_resets_count() -> None:
    b, _, changes = make()
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.available()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.available()
    assert changes == [BreakerState.OPEN]


def test_failures_outside_the_window_are_forgotten() -> None:
    b, clock, _ = make()
    b.record_failure()
    b.record_failure()
    clock.t += 11
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_half_open_trial_then_close() -> None:
    b, clock, changes = make()
    for _ in range(3):
        b.record_failure()
    clock.t += 4.9
    assert not b.available()
    clock.t += 0.2
    assert b.available() and b.state is BreakerState.HALF_OPEN
    b.on_dispatch()
    assert not b.available(), "one trial at a time"
    b.record_success()
    assert b.state is BreakerState.HALF_OPEN and b.available()
    b.on_dispatch()
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_half_open_failure_reopens_and_restarts_timeout() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.record_failure()
    clock.t += 6
    assert b.available()
    b.on_dispatch()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.t += 4
    assert not b.available()
    clock.t += 2
    assert b.available()


def test_cancelled_trial_frees_the_slot() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.record_failure()
    clock.t += 6
    assert b.available()
    b.on_dispatch()
    assert not b.available()
    b.record_cancelled()
    assert b.available()


def test_disabled_breaker_never_opens() -> None:
    b, _, _ = make(enabled=False)
    for _ in range(10):
        b.record_failure()
    assert b.available() and b.state is BreakerState.CLOSED


def test_reset() -> None:
    b, _, _ = make()
    for _ in range(3):
        b.record_failure()
    b.reset()
    assert b.state is BreakerState.CLOSED and b.available()
