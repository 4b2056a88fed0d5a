"""One error type for every front door, and the handlers that render it in each door's shape.

Code anywhere in a request raises `APIError(status, message)`; the app factory installs the
handlers with a renderer per path prefix (Anthropic's, Ollama's), OpenAI's shape being the
default: `{"error": {"message", "type", "param", "code"}}` with the status OpenAI would use, so
clients written for OpenAI (the SDK's typed exceptions, retry logic on 429/503) work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def utf8_safe(text: str) -> str:
    """`text` with any lone surrogate written as its `\\udXXX` escape, so UTF-8 can encode it."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class UnsupportedParameter(ValueError):
    """A request field with a value Freehold cannot honour (raised inside pydantic validators)."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(why)
        self.param = param


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
        message = utf8_safe(message)  # it may quote the request; every door encodes it as UTF-8
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


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message naming the first bad field, and that field's dotted path."""
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


Renderer = Callable[[APIError], Response]
Authenticate = Callable[[Request], Any]


class ErrorHandlers:
    """Every failure becomes an APIError rendered in the shape of the door it came through."""

    def __init__(self, shapes: dict[str, Renderer], authenticate: Authenticate) -> None:
        # Longest prefix first, so "/v1/messages" wins over a shorter one.
        self.shapes = sorted(shapes.items(), key=lambda kv: -len(kv[0]))
        self.authenticate = authenticate

    def render(self, request: Request, err: APIError) -> Response:
        return self.render_path(request.url.path, err)

    def render_path(self, path: str, err: APIError) -> Response:
        for prefix, renderer in self.shapes:
            if path == prefix.rstrip("/") or path.startswith(prefix):
                return renderer(err)
        return error_response(err)

    async def on_api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return self.render(request, exc)

    async def on_validation(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc)
        return self.render(request, APIError(400, message, param=param))

    async def on_http(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, APIError):
            # FastAPI reports any failure while reading a body as "error parsing the body"
            # (400); one of ours, such as the body-size limit (413), keeps its own status.
            return self.render(request, exc.__cause__)
        if exc.status_code in (404, 405):
            # Unknown routes need a key too: without one a caller learns nothing, not even 404.
            try:
                self.authenticate(request)
            except APIError as denied:
                return self.render(request, denied)
        message = {404: f"no route {request.url.path}", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail)
        )
        headers = dict(exc.headers or {})
        return self.render(request, APIError(exc.status_code, message, headers=headers))

    async def on_freehold(self, request: Request, exc: Exception) -> Response:
        return self.render(request, from_engine(exc))

    async def on_crash(self, request: Request, exc: Exception) -> Response:
        # The traceback goes to the server log; the client gets no internals.
        log.error("unhandled error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
        return self.render(request, APIError(500, "internal server error"))

    def install(self, app: FastAPI) -> None:
        app.add_exception_handler(APIError, self.on_api_error)
        app.add_exception_handler(RequestValidationError, self.on_validation)
        app.add_exception_handler(StarletteHTTPException, self.on_http)
        app.add_exception_handler(FreeholdError, self.on_freehold)
        app.add_exception_handler(Exception, self.on_crash)
