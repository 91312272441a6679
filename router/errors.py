"""Router errors: what can go wrong between the router and its workers.

Each maps to the HTTP status the router answers with (see :mod:`pdserve.errors`)::

    WorkerError (502)
    ├── UpstreamConnectError (502)   connect refused/reset, connection lost mid-response
    ├── UpstreamTimeoutError (504)   a connect or read timeout expired
    ├── UpstreamStatusError (status) a worker answered with a non-2xx status
    └── PeerLegFailedError (502)     the other leg of a PD pair failed, so this one was cancelled
    OverloadedError (503)
    ├── NoWorkerError (503)          no healthy worker of a needed role
    └── TooManyRequestsError (429)   the router's own admission limit is full
    WorkerConflictError (409)        registering a URL twice
    WorkerNotFoundError (404)        removing a URL that is not registered
"""

from __future__ import annotations

from typing import Any

from pdserve.errors import InvalidRequestError, OverloadedError, PdserveError, WorkerError


class UpstreamConnectError(WorkerError):
    """The TCP connection to a worker failed or was lost before the response completed."""


class UpstreamTimeoutError(WorkerError):
    http_status = 504
    err_type = "timeout_error"


class UpstreamStatusError(WorkerError):
    """A worker answered with ``status`` (>= 300); ``body`` is its response body (bytes).

    The instance's ``status`` is what the router passes on to its client when it gives up."""

    def __init__(self, message: str, *, status: int, body: bytes = b"", **details: Any) -> None:
        super().__init__(message, status=status, **details)
        self.status = status
        self.body = body

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_status, (self.message, self.status, self.body, self.details))


def _rebuild_status(message: str, status: int, body: bytes, details: dict[str, Any]) -> UpstreamStatusError:
    rest = {k: v for k, v in details.items() if k != "status"}
    return UpstreamStatusError(message, status=status, body=body, **rest)


class PeerLegFailedError(WorkerError):
    """Raised into one leg of a PD request when the other leg failed (the cause is attached)."""


class NoWorkerError(OverloadedError):
    """No routable (healthy, breaker not open) worker for a role."""


class TooManyRequestsError(OverloadedError):
    http_status = 429
    err_type = "rate_limit_error"


class WorkerConflictError(InvalidRequestError):
    """POST /workers for a URL that is already registered."""

    http_status = 409


class WorkerNotFoundError(PdserveError):
    """DELETE /workers for a URL that is not registered."""

    http_status = 404
    err_type = "not_found_error"
