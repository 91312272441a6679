"""The pdserve exception tree.

Every error pdserve raises on purpose derives from :class:`PdserveError`. Each class carries the
HTTP status it maps to, so a server turns any of them into an OpenAI-format error body with one
handler, and each survives pickling (Ray ships exceptions between processes)::

    PdserveError (500)
    ├── InvalidRequestError (400)        bad input from a client: sampling values, prompt too long
    │   ├── ContextLengthError (400)
    │   └── PayloadTooLargeError (413)
    ├── ModelNotFoundError (404)         unknown served model name
    ├── ConfigError (400)                a config file, CLI flag or model directory is unusable
    │   └── ModelLoadError (400)         missing/garbled checkpoint, unsupported architecture
    ├── OverloadedError (503)            no capacity now; retrying later may succeed
    ├── RequestTimeoutError (408)
    ├── AbortedError (499)               the client went away or the request was cancelled
    ├── WorkerError (502)                a worker failed or returned garbage
    └── (component trees)                kvtransfer.errors.TransferError, ...

Foreign exceptions are mapped to these at one boundary per component with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class PdserveError(Exception):
    """Base class. ``http_status`` is the status a server answers with; ``err_type`` the OpenAI
    error ``type`` string. Extra keyword fields are kept in ``details`` and survive pickling."""

    http_status: ClassVar[int] = 500
    err_type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.details.get("param"),
                "code": self.http_status,
            }
        }


def _rebuild(cls: type[PdserveError], message: str, details: dict[str, Any]) -> PdserveError:
    err = cls.__new__(cls)
    PdserveError.__init__(err, message, **details)
    return err


class InvalidRequestError(PdserveError):
    http_status = 400
    err_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    pass


class PayloadTooLargeError(InvalidRequestError):
    http_status = 413


class ModelNotFoundError(PdserveError):
    http_status = 404
    err_type = "not_found_error"


class ConfigError(PdserveError):
    http_status = 400
    err_type = "config_error"


class ModelLoadError(ConfigError):
    pass


class OverloadedError(PdserveError):
    http_status = 503
    err_type = "overloaded_error"


class RequestTimeoutError(PdserveError):
    http_status = 408
    err_type = "timeout_error"


class AbortedError(PdserveError):
    http_status = 499
    err_type = "aborted"


class WorkerError(PdserveError):
    http_status = 502
    err_type = "worker_error"
