"""HTTP details every Ollama route shares: its error shape, NDJSON lines, and JSON bodies
whatever their Content-Type."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from freehold.server.errors import APIError

NDJSON = "application/x-ndjson"


def error_response(err: APIError) -> JSONResponse:
    """Ollama's error shape: `{"error": "..."}` with the status."""
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class JSONBodyRoute(APIRoute):
    """Ollama reads a request body as JSON whatever its Content-Type: its own examples post with
    `curl -d`, which labels the body as a form, and many scripts copy them."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            if "json" not in request.headers.get("content-type", ""):
                kept = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                request.scope["headers"] = [*kept, (b"content-type", b"application/json")]
                request = Request(request.scope, request.receive)
            return await handler(request)

        return route
