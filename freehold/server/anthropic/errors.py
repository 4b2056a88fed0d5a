"""Errors in Anthropic's shape: `{"type": "error", "error": {"type": ..., "message": ...}}`.

Statuses are the shared path's (a full queue stays 429, as on every door); only the body's
`type` follows Anthropic's names, so the SDK raises its matching exception class.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from freehold.server.anthropic.protocol import ErrorBody, ErrorDetail
from freehold.server.errors import APIError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

_OVERFLOW = re.compile(r"the prompt is (\d+) tokens but the context holds (\d+)")


def error_type(status: int) -> str:
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def message_of(err: APIError) -> str:
    """The error's message; a prompt longer than the context is worded as Anthropic words it
    ("prompt is too long: N tokens > M maximum"), which Claude Code recognises."""
    if err.code != "context_length_exceeded":
        return err.message
    m = _OVERFLOW.search(err.message)
    if m is None:
        return f"prompt is too long: {err.message}"
    n, ctx = int(m.group(1)), int(m.group(2))
    return (
        f"prompt is too long: {n} tokens > {ctx - 1} maximum (the model's context holds {ctx} "
        "tokens per request; shorten the prompt or serve the model with a larger --ctx)"
    )


def error_body(err: APIError) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(type=error_type(err.status), message=message_of(err)))


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err).model_dump(), status_code=err.status, headers=err.headers)
