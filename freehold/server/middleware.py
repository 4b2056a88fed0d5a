"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and slow every stream).

- every response carries `x-request-id` (the client's, if it sent a sane one, else a new one);
- request bodies over the limit are refused with 413 before they are read into memory.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from freehold.server.errors import APIError

RenderError = Callable[[str, APIError], Response]  # (path, error) -> the door's error response

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BodyTooLarge(APIError):
    # An APIError, so the app's own handler answers 413 when the app is reading the body.
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than {limit} bytes", code="body_too_large"
        )


class RequestIdAndLimits:
    def __init__(self, app: ASGIApp, max_body_bytes: int, render_error: RenderError) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _incoming_id(scope) or f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        length = _content_length(scope)
        if length is not None and length > self.max_body:
            await self._too_large(scope, receive, send_with_id)
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        try:
            await self.app(scope, counted_receive, send_with_id)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send_with_id)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.render_error(scope["path"], BodyTooLarge(self.max_body))
        response.headers["connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SANE_ID.match(text) else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
