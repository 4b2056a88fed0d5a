"""Errors in OpenAI's JSON shape, and the handlers that turn every failure into one.

`{"error": {"message", "type", "param", "code"}}` with the status OpenAI would use: clients
written for OpenAI (the SDK's typed exceptions, retry logic on 429/503) then work unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from freehold.errors import FreeholdError, InvalidInput, NotFound

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """Raise from anywhere in a request; the handler renders it as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def from_engine(e: Exception) -> APIError:
    """Map the engine's and vault's exceptions onto HTTP statuses."""
    from freehold.engine import ContextOverflow, EngineClosed, QueueFull

    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, ContextOverflow):
        return APIError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, EngineClosed):
        return APIError(503, str(e), code="model_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, NotFound):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, InvalidInput):
        return APIError(400, str(e))
    if isinstance(e, FreeholdError):
        return APIError(500, str(e))
    return APIError(500, "internal server error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    from freehold.server.protocol import UnsupportedParameter

    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    ctx_error = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_error, UnsupportedParameter):
        return str(ctx_error), ctx_error.param
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(exc)
    return error_response(APIError(400, message, param=param))


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (404, 405):
        # Unknown routes need a key too: without one a caller learns nothing, not even 404.
        from freehold.server.routes.deps import authenticate

        try:
            authenticate(request)
        except APIError as denied:
            return error_response(denied)
    message = {404: f"no route {request.url.path}", 405: "method not allowed"}.get(
        exc.status_code, str(exc.detail)
    )
    return error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))


async def _on_freehold(request: Request, exc: Exception) -> Response:
    return error_response(from_engine(exc))


async def _on_crash(request: Request, exc: Exception) -> Response:
    # The traceback goes to the server log; the client gets no internals.
    log.error("unhandled error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
    return error_response(APIError(500, "internal server error"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(FreeholdError, _on_freehold)
    app.add_exception_handler(Exception, _on_crash)


def sse_error(err: APIError) -> bytes:
    """An error inside a stream that has already started (status 200 is already sent)."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"
