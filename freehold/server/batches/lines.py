"""A batch's input file, line by line: what is wrong with the file as a whole (a 400 for the
create call), and what is wrong with each line (a line in the error file).

A line's body is checked by the same pydantic models the OpenAI door parses its requests with,
so a batch line is refused exactly when the endpoint would refuse it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from freehold.server.bodies import check_value
from freehold.server.errors import APIError, validation_message
from freehold.server.openai import chat, completions
from freehold.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)

MAX_LINES = 50_000  # OpenAI's limit per batch

DoorRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
_MODELS: dict[str, type[DoorRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}


class LineRefused(ValueError):
    """Why one line cannot run; it goes to the error file."""


@dataclass
class ParsedLine:
    line: int  # 1-based, in the input file
    custom_id: str | None
    body: dict[str, Any] | None  # None: refused
    error: str | None = None


def parse_input(data: bytes, endpoint: str) -> list[ParsedLine]:
    """Every non-blank line of a batch input file, each parsed or refused with why.

    Raises a 400 APIError when the file as a whole is not a batch input: not UTF-8, no line a
    JSON object, or more than MAX_LINES requests."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _file_error(f"the input file is not UTF-8 text (byte {e.start}); send JSONL") from e
    numbered = [(n, raw) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    if len(numbered) > MAX_LINES:
        raise _file_error(
            f"the input file has {len(numbered)} requests; a batch takes at most {MAX_LINES}: "
            "split it into several batches"
        )
    if not any(_is_object(raw) for _, raw in numbered):
        raise _file_error(
            "the input file is not JSONL: no line is a JSON object. Write one request a line: "
            '{"custom_id": "...", "method": "POST", "url": "' + endpoint + '", "body": {...}}'
        )
    seen: set[str] = set()
    return [_parse_line(n, raw, endpoint, seen) for n, raw in numbered]


def door_request(endpoint: str, body: dict[str, Any]) -> DoorRequest:
    """The endpoint's own request model for a line's body, or LineRefused saying why."""
    try:
        req = _MODELS[endpoint].model_validate(body)
    except ValidationError as e:
        message, _ = validation_message(RequestValidationError(e.errors()))
        raise LineRefused(f"the body is not a valid {endpoint} request: {message}") from None
    if getattr(req, "stream", False):
        raise LineRefused("batch lines cannot stream: remove 'stream' from the body")
    try:
        if isinstance(req, ChatCompletionRequest):
            chat.generation_request(req)
        elif isinstance(req, CompletionRequest):
            completions.generation_request(req)
    except APIError as e:
        raise LineRefused(f"the body is not a valid {endpoint} request: {e.message}") from None
    return req


def _parse_line(n: int, raw: str, endpoint: str, seen: set[str]) -> ParsedLine:
    custom_id: str | None = None
    try:
        obj = _json_object(raw)
        custom_id = _custom_id(obj)
        if custom_id in seen:
            custom_id = None  # the first line with it keeps it; outputs stay keyed one-to-one
            raise LineRefused(f"custom_id {obj['custom_id']!r} is used by an earlier line")
        seen.add(custom_id)
        body = _request_body(obj, endpoint)
        door_request(endpoint, body)
    except LineRefused as e:
        return ParsedLine(n, custom_id, None, f"line {n}: {e}")
    return ParsedLine(n, custom_id, body)


def _json_object(raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise LineRefused(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise LineRefused("not a JSON object")
    try:
        check_value(obj)  # the strict-JSON rules every request body obeys (no NaN, surrogates)
    except APIError as e:
        raise LineRefused(e.message) from None
    return obj


def _custom_id(obj: dict[str, Any]) -> str:
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise LineRefused("'custom_id' is missing; every line needs a unique string custom_id")
    if len(cid) > 512:
        raise LineRefused("'custom_id' is longer than 512 characters")
    return cid


def _request_body(obj: dict[str, Any], endpoint: str) -> dict[str, Any]:
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        raise LineRefused(f"unknown field(s) {', '.join(sorted(extra))}")
    if obj.get("method") != "POST":
        raise LineRefused(f"'method' must be \"POST\", got {obj.get('method')!r}")
    if obj.get("url") != endpoint:
        raise LineRefused(
            f"'url' {obj.get('url')!r} is not the batch's endpoint {endpoint!r}; "
            "a batch runs one endpoint"
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineRefused("'body' must be a JSON object: the request the endpoint takes")
    return body


def _is_object(raw: str) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


def _file_error(message: str) -> APIError:
    return APIError(400, message, param="input_file_id", code="invalid_input_file")
