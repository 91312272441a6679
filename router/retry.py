"""Retry and circuit-breaker verdicts on upstream failures.

A failure before the first token reaches the client is retried on a new pair (with a new room)
when it is a connection error, a timeout, or one of the configured statuses (SGLang's routers:
408/429/500/502/503/504); other 4xx answers are the client's fault and pass through. A failure
counts against a worker's breaker when the worker itself misbehaved (connection, timeout, 5xx,
408) -- not for 429 (busy, not broken) or when the other leg of its pair failed.
"""

from __future__ import annotations

from pdserve.router.errors import (
    PeerLegFailedError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)

# every value failure_kind() returns (metrics pre-create their series with these)
FAILURE_KINDS = ("peer", "timeout", "connect", "http_4xx", "http_5xx", "other")


def failure_kind(exc: BaseException, root: bool = False) -> str:
    """Low-cardinality label for a failure (``root``: a peer-leg failure is named by its cause)."""
    if isinstance(exc, PeerLegFailedError):
        if root and exc.__cause__ is not None:
            return failure_kind(exc.__cause__)
        return "peer"
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    if isinstance(exc, UpstreamStatusError):
        return f"http_{exc.status // 100}xx"
    return "other"


def is_retryable(exc: BaseException, statuses: tuple[int, ...]) -> bool:
    """Retry on connection errors, timeouts and the configured statuses (not on other 4xx)."""
    if isinstance(exc, PeerLegFailedError):
        cause = exc.__cause__
        return cause is None or is_retryable(cause, statuses)
    if isinstance(exc, UpstreamStatusError):
        return exc.status in statuses
    return isinstance(exc, UpstreamConnectError | UpstreamTimeoutError)


def counts_against_worker(exc: BaseException) -> bool:
    """Whether a failure should count toward the worker's circuit breaker."""
    if isinstance(exc, UpstreamStatusError):
        return exc.status >= 500 or exc.status == 408
    return isinstance(exc, UpstreamConnectError | UpstreamTimeoutError)
