"""Request bodies are strict JSON, checked once, before any door reads them.

Python's `json` accepts more than JSON (RFC 8259): NaN and ±Infinity, numbers that overflow
to infinity (1e400), escapes of lone UTF-16 surrogates ("\\ud800" is a valid escape but no
character; so are the raw bytes ED A0 80 that `json.loads(bytes)` lets through), and nesting as
deep as the interpreter's recursion limit. Each reached an encoder later (the audit log's prompt
digest, the tokenizer, SQLite, a response's UTF-8) or the engine as a sampling parameter, and
became a 500 or a nonsense answer. So every body is checked here for every door: it must be
UTF-8 and, once parsed, hold only finite numbers, whole Unicode strings and at most `MAX_DEPTH`
levels of nesting. A body that breaks a rule is refused with 400 in the door's own error shape,
naming the field (as Anthropic's API and llama.cpp's server refuse a lone surrogate, rather than
guessing at the text it stood for); a body that is not JSON at all is left to the route, whose
parser reports it as before.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from freehold.server.errors import APIError

# serde_json's default limit: far beyond any real request (a tool's JSON Schema nests a few
# levels per level of its data), and far below what the parser, pydantic, the chat template or
# a JSON-Schema-to-grammar conversion can recurse through.
MAX_DEPTH = 128

_SURROGATE = re.compile("[\ud800-\udfff]")
_INVALID = "invalid_request_body"


def check_body(raw: bytes) -> None:
    """Raise a 400 APIError naming the first field of `raw` that is not strict JSON.

    A body that is not JSON at all passes (an upload, say): the route says what it takes."""
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = (raw[bom:] if bom else raw).decode("utf-8")  # strict: refuses ED A0 80 too
    except UnicodeDecodeError as e:
        # JSON with bad bytes in it, or what Python's parser would read as UTF-16/32 (its
        # guess from NUL bytes), or with `surrogatepass`, which lets encoded surrogates in.
        if _parses(raw.decode("utf-8", "replace")) or _parses(raw):
            at = bom + e.start
            raise APIError(
                400,
                f"the request body is not valid UTF-8 (byte 0x{raw[at]:02x} at offset {at}); "
                "send JSON encoded as UTF-8",
                code=_INVALID,
            ) from None
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if _parses(raw):  # UTF-8, but Python's parser would read it as UTF-16/32
            raise APIError(
                400, "the request body is not JSON encoded as UTF-8", code=_INVALID
            ) from None
        return
    except RecursionError:
        raise _too_deep(None) from None
    except ValueError:  # an integer past Python's limit on digits read
        raise APIError(
            400,
            f"the request body has an integer of more than {sys.get_int_max_str_digits()} "
            "digits; send a shorter number",
            code=_INVALID,
        ) from None
    check_value(value)


def _parses(body: str | bytes) -> bool:
    """Whether Python's parser, as the routes use it, reads `body` as JSON."""
    try:
        json.loads(body)
    except Exception:  # JSONDecodeError, UnicodeDecodeError, RecursionError...
        return False
    return True


def check_value(value: Any) -> None:
    """Raise a 400 APIError for the first lone surrogate, non-finite number or level of nesting
    past MAX_DEPTH in a parsed body, in document order. Iterative: no recursion to exhaust."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise _bad_number(v, path)
        elif isinstance(v, dict | list):
            if len(path) >= MAX_DEPTH:
                raise _too_deep(path)
            if isinstance(v, dict):
                for k in v:
                    _check_text(k, path, key=True)
                items = [(x, (*path, str(k))) for k, x in v.items()]
            else:
                items = [(x, (*path, str(i))) for i, x in enumerate(v)]
            stack.extend(reversed(items))


def _check_text(s: str, path: tuple[str, ...], *, key: bool = False) -> None:
    if s.isascii():
        return
    m = _SURROGATE.search(s)
    if m is None:
        return
    where = _dotted(path)
    what = f"a key of {where}" if key and path else ("a key" if key else where)
    raise APIError(
        400,
        f"{what} contains a lone UTF-16 surrogate (U+{ord(m.group()):04X} at character "
        f"{m.start()}), which is not Unicode text; send each surrogate pair whole, or the text "
        "as valid UTF-8",
        param=_dotted(path) if path else None,
        code=_INVALID,
    )


def _bad_number(v: float, path: tuple[str, ...]) -> APIError:
    where = _dotted(path) or "the body"
    return APIError(
        400,
        f"{where} is not a finite number; NaN, Infinity and numbers beyond ±1.8e308 are not "
        "JSON numbers: send a finite number",
        param=_dotted(path) or None,
        code=_INVALID,
    )


def _too_deep(path: tuple[str, ...] | None) -> APIError:
    where = f" at {_dotted(path)}" if path else ""
    return APIError(
        400,
        f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep{where}",
        param=_dotted(path) if path else None,
        code=_INVALID,
    )


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


RenderError = Callable[[str, APIError], Response]  # (path, error) -> the door's error response


class StrictJSONBodies:
    """ASGI middleware: read a request's body, `check_body` it, and either answer its 400 in
    the door's shape or hand the app the same body. (The app parses it again: a few
    milliseconds for the largest bodies the size limit lets through.)"""

    def __init__(self, app: ASGIApp, render_error: RenderError) -> None:
        self.app = app
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        messages = await _read_body(receive)
        raw = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        if raw and messages[-1]["type"] == "http.request":
            try:
                check_body(raw)
            except APIError as err:
                await self.render_error(scope["path"], err)(scope, receive, send)
                return
        await self.app(scope, _replay(messages, receive), send)


async def _read_body(receive: Receive) -> list[Message]:
    """Every message up to the body's end (or the client's disconnect)."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """The messages already read, then the connection's own (e.g. the disconnect that cancels
    a generation)."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
