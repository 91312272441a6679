"""HTTP error mapping (every error is an OpenAI error body) and the request body size limit.

``install_error_handlers(app)`` maps:

- :class:`~pdserve.errors.PdserveError` -> its ``http_status`` and ``err.to_openai()``;
- FastAPI ``RequestValidationError`` (pydantic body validation, malformed JSON) -> **400** (not 422)
  with a message naming the field;
- Starlette ``HTTPException`` (unknown route 404, wrong method 405, ...) -> that status;
- anything else -> 500 with a generic body, logged with its traceback.

:class:`BodySizeLimitMiddleware` is pure ASGI: it rejects a declared ``Content-Length`` over the
limit before the body is read, and counts streamed (chunked) bodies as they are received.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from pdserve.api.asgi import ASGIApp, Message, Receive, Scope, Send
from pdserve.api.protocol import validation_error_to_invalid
from pdserve.errors import ConfigError, PayloadTooLargeError, PdserveError

logger = logging.getLogger(__name__)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int, message: str, err_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": err_type or _STATUS_TYPES.get(status, "internal_error" if status >= 500 else "error"),
            "param": param,
            "code": status,
        }
    }


def json_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: PdserveError) -> Response:
    return json_error(exc.http_status, exc.to_openai())


async def _pdserve_handler(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, PdserveError):  # registered for PdserveError only
        raise exc
    if exc.http_status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.http_status, exc.message)
    return error_response(exc)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return error_response(validation_error_to_invalid(list(errors)))


async def _http_handler(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    status = exc.status_code
    if status == 404:
        message = f"{request.method} {request.url.path}: no such route"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    return json_error(status, error_body(status, message), headers)


async def _unexpected_handler(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_error(500, error_body(500, "internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    """Make every error response of ``app`` an OpenAI error body with the right status."""
    app.add_exception_handler(PdserveError, _pdserve_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: 413 for HTTP request bodies larger than ``max_body_bytes``.

    A declared ``Content-Length`` over the limit is answered at once (the body is never read). A
    body without one is counted as it streams in; when the count passes the limit, ``receive``
    raises a 413 ``HTTPException``, which the app's error handler turns into an OpenAI 413 body
    (or this middleware does, if it escapes before the response started).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(send, 400, "invalid Content-Length header")
                    return
                if declared > limit:
                    await self._reject(send, 413, self._too_large(limit))
                    return
                break

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI re-raises it from body parsing (anything else it
                    # turns into "400 error parsing the body").
                    raise StarletteHTTPException(413, detail=self._too_large(limit))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (StarletteHTTPException, PayloadTooLargeError) as exc:
            too_large = isinstance(exc, PayloadTooLargeError) or exc.status_code == 413
            if started or not too_large:
                raise
            await self._reject(send, 413, self._too_large(limit))

    @staticmethod
    def _too_large(limit: int) -> str:
        return f"request body is larger than the limit of {limit} bytes"

    @staticmethod
    async def _reject(send: Send, status: int, message: str) -> None:
        body = orjson.dumps(error_body(status, message))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
