"""Hostile requests on every route (issue 13, item 2): text that breaks encoders, invalid UTF-8,
NaN and overflowing numbers, deep nesting, 1 MB single tokens.

One rule for every route: whatever arrives, the answer is a 4xx in the route's own error shape or
a correct 200, never a 5xx; the server stays up; every ledger row and audit line is written.
Request bodies are checked once, before any door reads them (freehold/server/bodies.py).

- The check itself is fuzzed with hypothesis (thousands of generated bodies, fixed seed): it
  accepts exactly what every sink can encode (strict JSON, UTF-8, the prompt digest, SQLite),
  and the field a refusal names holds the bad value.
- Against a real server on SmolLM2, with content logging on so that hostile text reaches the
  audit log: each route's minimal valid body with every string replaced by each hostile text,
  every numeric field its schema describes set to each hostile number, invalid UTF-8 bytes,
  nesting at and past the limit (also inside JSON Schemas, which the grammar converter walks
  recursively), and 1 MB single tokens.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import Running, running_server

from freehold.server.anthropic.errors import error_response as anthropic_error
from freehold.server.audit import AuditLog, prompt_digest
from freehold.server.bodies import MAX_DEPTH, check_body
from freehold.server.errors import APIError
from freehold.server.errors import error_response as openai_error
from freehold.server.ledger import Ledger, UsageRecord, now_iso
from freehold.server.ollama.http import error_response as ollama_error
from freehold.server.writer import BatchWriter

MODEL = "smollm2"
EXAMPLES = int(os.environ.get("FREEHOLD_HOSTILE_EXAMPLES", "1000"))  # generated bodies
TIMEOUT_S = 120.0  # a 1 MB prompt is tokenized in well under that; longer would be a hang
_SURROGATE = re.compile("[\ud800-\udfff]")

# -- what is sent ------------------------------------------------------------------------------

# A minimal valid body per route that takes one: short prompts, one generated token.
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 1,
        "stop": ["\n\n"],
        "user": "someone",
    },
    "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "stop": "\n\n"},
    "/v1/embeddings": {"model": MODEL, "input": ["Hi", "there"]},
    "/v1/responses": {
        "model": MODEL,
        "input": "Hi",
        "instructions": "Be brief.",
        "max_output_tokens": 1,
        "metadata": {"k": "v"},
    },
    "/v1/messages": {
        "model": MODEL,
        "max_tokens": 1,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}],
        "stop_sequences": ["\n\n"],
        "metadata": {"user_id": "someone"},
    },
    "/v1/messages/count_tokens": {
        "model": MODEL,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}],
    },
    "/api/chat": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": False,
        "options": {"num_predict": 1, "stop": ["\n\n"]},
    },
    "/api/generate": {
        "model": MODEL,
        "prompt": "Hi",
        "system": "Be brief.",
        "stream": False,
        "options": {"num_predict": 1},
    },
    "/api/embed": {"model": MODEL, "input": ["Hi"]},
    "/api/embeddings": {"model": MODEL, "prompt": "Hi"},
    "/api/show": {"model": MODEL},
    "/api/pull": {"model": MODEL, "stream": False},
}
# Where each route's prompt text is (for the byte-level and 1 MB cases).
PROMPTS: dict[str, tuple[str | int, ...]] = {
    "/v1/chat/completions": ("messages", 1, "content"),
    "/v1/completions": ("prompt",),
    "/v1/embeddings": ("input", 0),
    "/v1/responses": ("input",),
    "/v1/messages": ("messages", 0, "content"),
    "/v1/messages/count_tokens": ("messages", 0, "content"),
    "/api/chat": ("messages", 0, "content"),
    "/api/generate": ("prompt",),
    "/api/embed": ("input", 0),
    "/api/embeddings": ("prompt",),
}
# Routes that take no body: hostile text goes into their path parameters.
PATH_ROUTES = [
    ("GET", "/v1/models/{}"),
    ("GET", "/v1/responses/{}"),
    ("DELETE", "/v1/responses/{}"),
    ("GET", "/v1/files/{}"),
    ("GET", "/v1/files/{}/content"),
    ("DELETE", "/v1/files/{}"),
    ("GET", "/v1/batches/{}"),
    ("POST", "/v1/batches/{}/cancel"),
]
# POST routes outside BODIES, whose body is not a standalone JSON request: the Files API's
# multipart upload, a batch's cancel (no body), and a batch's create, which needs an uploaded
# file first (its hostile cases are test_hostile_text_in_a_batch below).
OTHER_POSTS = {"/v1/files", "/v1/batches", "/v1/batches/{batch_id}/cancel"}

HOSTILE_TEXTS = {
    "lone high surrogate": "\ud800",
    "lone low surrogate": "a\udfffb",
    "surrogates reversed": "\udc00\ud800",
    "half an emoji": "smile \ud83d",
    "NUL": "\x00",
    "NUL inside": "be\x00fore",
    "control characters": "\x1b[31m\x07\x7f\x08\x1f",
    "right-to-left marks": "\u202eolleh\u202c \u200f\u061c",
    "BOM and zero-width": "\ufeff\u200b\u200d\u2060",
    "noncharacters": "\ufffe\uffff\U0010ffff",
    "an emoji, whole": "\U0001f600",
    "combining marks": "e" + "\u0301" * 64,
    "special-token text": "<|im_end|>\n<|im_start|>system",
}
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e309", "-1e400"]
FINITE = ["1e308", "-1e308", "-0", "5e-324", "-1", "18446744073709551616"]
INVALID_UTF8 = {
    "0xff": b"\xff",
    "encoded surrogate (CESU-8)": b"\xed\xa0\x80",
    "overlong '/'": b"\xc0\xaf",
    "lone continuation byte": b"\x80",
    "truncated sequence": b"\xe2\x82",
}
_PLACEHOLDER = "@@hostile@@"


def raw_body(body: dict[str, Any], literal: bytes | None = None) -> bytes:
    """`body` as a client would send it: JSON with \\u escapes for anything non-ASCII (so a lone
    surrogate is the six characters \\ud800). A `_PLACEHOLDER` string becomes `literal`."""
    text = json.dumps(body, ensure_ascii=True).encode()
    if literal is not None:
        text = text.replace(f'"{_PLACEHOLDER}"'.encode(), literal)
    return text


def leaves(v: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    if isinstance(v, dict):
        for k, x in v.items():
            yield from leaves(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from leaves(x, (*path, i))
    else:
        yield path, v


def with_value(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node: Any = out
    for p in path[:-1]:
        if isinstance(node, dict) and p not in node:
            node[p] = {}
        node = node[p]
    node[path[-1]] = value
    return out


def dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    return 0


# -- what the description says each route takes ------------------------------------------------


def _spec() -> dict[str, Any]:
    from test_api_fuzz import SPEC  # the app's own description, built without a server

    return SPEC


def _resolve(s: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in s:
        s = _spec()["components"]["schemas"][s["$ref"].rsplit("/", 1)[-1]]
    return s


def _alternatives(s: dict[str, Any]) -> list[dict[str, Any]]:
    s = _resolve(s)
    alts = s.get("anyOf") or s.get("oneOf")
    return [a for alt in alts for a in _alternatives(alt)] if alts else [s]


def numeric_fields(route: str) -> list[tuple[str, ...]]:
    """Every number and integer field of `route`'s body, two objects deep (e.g. options.top_k)."""
    op = _spec()["paths"][route]["post"]
    root = op["requestBody"]["content"]["application/json"]["schema"]
    found: list[tuple[str, ...]] = []

    def walk(s: dict[str, Any], path: tuple[str, ...]) -> None:
        alts = _alternatives(s)
        if path and any(a.get("type") in ("number", "integer") for a in alts):
            found.append(path)
        if len(path) < 2:
            for a in alts:
                for name, sub in a.get("properties", {}).items():
                    walk(sub, (*path, name))

    walk(root, ())
    return sorted(set(found))


# -- what comes back ---------------------------------------------------------------------------


def error_message(route: str, r: httpx.Response) -> str:
    """The message of a 4xx, asserting it is in the route's own error shape."""
    body = r.json()
    if route.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["type"], str), r.text
        return body["error"]["message"]
    if route.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), r.text
        return body["error"]
    assert isinstance(body["error"]["type"], str) and "param" in body["error"], r.text
    return body["error"]["message"]


def answered(route: str, r: httpx.Response, what: str) -> str | None:
    """Assert a 4xx in the route's shape or a 200 with a JSON body; the 4xx's message."""
    assert r.status_code < 500, (route, what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        return error_message(route, r)
    assert r.status_code == 200, (route, what, r.status_code, r.text[:500])
    if r.content:
        r.json()
    return None


def refused(route: str, r: httpx.Response, what: str, *words: str) -> str:
    """Assert a 400 in the route's shape whose message has every one of `words`."""
    assert r.status_code == 400, (route, what, r.status_code, r.text[:500])
    message = error_message(route, r)
    for w in words:
        assert w in message, (route, what, message)
    return message


# -- the gate, fuzzed (no server) ----------------------------------------------------------------


def _encodable(v: Any) -> bool:
    """What the strictest sink accepts: RFC 8259 JSON (no NaN), encoded as UTF-8."""
    try:
        json.dumps(v, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def _at(v: Any, param: str) -> Any:
    for p in param.split("."):
        v = v[int(p)] if isinstance(v, list) else v[p]
    return v


_chars = st.one_of(
    st.characters(exclude_categories=[]),  # every code point, lone surrogates included
    st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "\U0001f600"]),
)
_text = st.text(_chars, max_size=12)
_keys = st.text(_chars.filter(lambda c: c != "."), max_size=6)  # a dotted param stays readable
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and ±Infinity included
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=24,
)


@given(value=_json)
@settings(
    max_examples=EXAMPLES,
    derandomize=True,  # a fixed seed: the same bodies on every run
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_gate_accepts_exactly_what_every_sink_can_encode(value: Any) -> None:
    raw = json.dumps(value, ensure_ascii=True).encode()  # NaN as NaN, U+D800 as \ud800
    parsed = json.loads(raw)  # what a server on Python's parser holds (a split pair is whole)
    try:
        check_body(raw)
    except APIError as e:
        assert e.status == 400 and e.message
        assert not _encodable(parsed), (parsed, e.message)
        if e.param is not None:  # the field it names holds the bad value (or a bad key)
            assert not _encodable(_at(parsed, e.param)), (parsed, e.param)
        return
    assert _encodable(parsed), parsed
    assert len(prompt_digest(parsed)) == 64
    with sqlite3.connect(":memory:") as db:
        db.execute("CREATE TABLE t (v TEXT)")
        db.executemany("INSERT INTO t VALUES (?)", [(s,) for s in _strings(parsed)])


def _strings(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)


def test_the_gate_names_the_field_and_the_problem() -> None:
    def refusal(raw: bytes) -> APIError:
        with pytest.raises(APIError) as e:
            check_body(raw)
        assert e.value.status == 400
        return e.value

    e = refusal(b'{"messages": [{"role": "user", "content": "a\\ud800"}]}')
    assert e.param == "messages.0.content" and "lone UTF-16 surrogate (U+D800" in e.message
    e = refusal(b'{"temperature": NaN}')
    assert e.param == "temperature" and "not a finite number" in e.message
    e = refusal(b'{"options": {"top_p": 1e400}}')
    assert e.param == "options.top_p"
    e = refusal(b'{"a": {"\\udfff": 1}}')
    assert e.param == "a" and e.message.startswith("a key of a contains")
    e = refusal(b'{"prompt": "\xed\xa0\x80"}')
    assert "not valid UTF-8 (byte 0xed at offset 12)" in e.message
    e = refusal(b"[" * 100_000 + b"]" * 100_000)
    assert f"more than {MAX_DEPTH} levels" in e.message
    e = refusal(json.dumps({"x": nested_list(MAX_DEPTH)}).encode())
    assert e.param is not None and e.param.startswith("x.0.0")
    e = refusal(b'{"seed": ' + b"9" * 5000 + b"}")
    assert "integer of more than 4300 digits" in e.message
    # Python's parser reads NUL-laden bytes as UTF-16: that must not be a way around the check.
    e = refusal('{"t": NaN, "p": "\\ud800"}'.encode("utf-16-le"))
    assert "not JSON encoded as UTF-8" in e.message
    # What is only unusual passes: pairs, NUL, right-to-left marks, -0, 1e308, depth at the limit.
    for ok in (
        b'{"a": "\\ud83d\\ude00 \\u0000 \\u202e", "b": -0, "c": 1e308, "d": 1e-400}',
        b'\xef\xbb\xbf{"bom": "then UTF-8"}',
        json.dumps(nested_list(MAX_DEPTH - 1)).encode(),
        b"not JSON at all: the route's parser says so",
        b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary: an upload, which its route refuses or takes",
    ):
        check_body(ok)


def nested_list(levels: int) -> Any:
    v: Any = 0
    for _ in range(levels):
        v = [v]
    return v


# -- the sinks, whatever reaches them (no server) -----------------------------------------------


def test_prompt_digest_takes_lone_surrogates() -> None:
    assert prompt_digest(["\ud800"]) != prompt_digest(["\udc00"])
    assert prompt_digest({"p": "a\ud800"}) == prompt_digest({"p": "a\ud800"})


def test_audit_line_keeps_a_lone_surrogate_readable(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", log_content=True)
    try:
        log.write({"prompt": "a\ud800b\x00\u202e", "n": float("nan")})
        log.write({"prompt": "next"})
        assert log.flush()
    finally:
        log.close()
    lines = (tmp_path / "audit.jsonl").read_bytes().decode("utf-8").splitlines()  # strict
    assert [json.loads(x)["prompt"] for x in lines] == ["a\ud800b\x00\u202e", "next"]


def test_ledger_row_with_lone_surrogates_is_written(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        for model in ("m\ud800", "ok"):
            ledger.record(
                UsageRecord("r", now_iso(), None, model, "chat", 1, 0, 1, None, 1.0, 404, "\udfff")
            )
        assert ledger.flush()
    finally:
        ledger.close()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT model, user FROM requests ORDER BY id").fetchall()
    assert rows == [("m\\ud800", "\\udfff"), ("ok", "\\udfff")]


class _Flaky(BatchWriter):
    """Pure logic: a writer whose sink fails on one item."""

    def __init__(self) -> None:
        self.written: list[str] = []
        super().__init__("test-flaky")

    def _write_batch(self, items: list[Any]) -> None:
        if "bad" in items:
            raise ValueError("cannot write this")
        self.written.extend(items)

    def _close_sink(self) -> None:
        pass


def test_a_batch_that_fails_does_not_stop_the_writer() -> None:
    w = _Flaky()
    try:
        w._put("bad")
        assert w.flush()
        w._put("good")
        assert w.flush()  # the thread lives on, and nothing is left pending
    finally:
        w.close()
    assert w.written == ["good"]


@pytest.mark.parametrize(
    ("render", "message"),
    [
        (openai_error, lambda b: b["error"]["message"]),
        (anthropic_error, lambda b: b["error"]["message"]),
        (ollama_error, lambda b: b["error"]),
    ],
)
def test_every_error_shape_renders_any_message(render: Any, message: Any) -> None:
    r = render(APIError(404, "no model named 'x\ud800' \x00\u202e"))
    body = json.loads(bytes(r.body).decode("utf-8"))  # strict UTF-8
    assert message(body) == "no model named 'x\\ud800' \x00\u202e"


# -- every route, on a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Running]:
    home = tmp_path_factory.mktemp("hostile-home")
    # Content logging on: hostile text that is let through reaches the audit log as text.
    with running_server(
        home, {MODEL: smollm2_path}, slots=2, ctx=256, store_responses=True, log_content=True
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[httpx.Client]:
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=server.base, headers=headers, timeout=TIMEOUT_S) as c:
        yield c


def test_every_post_route_has_a_body_here() -> None:
    posts = {p for p, ops in _spec()["paths"].items() if "post" in ops} - OTHER_POSTS
    assert posts == set(BODIES), f"add a minimal body for: {posts ^ set(BODIES)}"


def test_the_base_bodies_are_answered(client: httpx.Client) -> None:
    for route, body in BODIES.items():
        r = client.post(route, content=raw_body(body))
        # A pull imports from this machine's Ollama store, which has no such model here (pulls
        # that import are test_api_ollama's); the hostile cases below vary its name.
        assert r.status_code == (404 if route == "/api/pull" else 200), (route, r.text)


@pytest.mark.parametrize("route", BODIES)
def test_a_lone_surrogate_is_a_400_naming_the_field(client: httpx.Client, route: str) -> None:
    """The regression: a chat message of "\\ud800" (valid JSON) was a 500, as the audit log's
    prompt digest failed to encode it."""
    path = PROMPTS.get(route, ("model",))
    r = client.post(route, content=raw_body(with_value(BODIES[route], path, "\ud800")))
    message = refused(route, r, "surrogate", dotted(path), "lone UTF-16 surrogate (U+D800")
    if not route.startswith(("/v1/messages", "/api/")):
        assert r.json()["error"]["param"] == dotted(path), message


@pytest.mark.parametrize("route", BODIES)
def test_hostile_text_in_every_string(client: httpx.Client, route: str) -> None:
    body = BODIES[route]
    strings = [p for p, v in leaves(body) if isinstance(v, str)]
    for path in strings:
        for name, text in HOSTILE_TEXTS.items():
            r = client.post(route, content=raw_body(with_value(body, path, text)))
            what = f"{dotted(path)} = {name}"
            if _SURROGATE.search(text):
                refused(route, r, what, "surrogate", dotted(path))
            else:
                answered(route, r, what)
    # ... and as a field's name, where a door passes unknown fields on (chat messages do).
    holder = ("messages", 0) if "messages" in body else ()
    for name, text in HOSTILE_TEXTS.items():
        r = client.post(route, content=raw_body(with_value(body, (*holder, text), "x")))
        if _SURROGATE.search(text):
            refused(route, r, f"key {name}", "surrogate")
        else:
            answered(route, r, f"key {name}")


@pytest.mark.parametrize("route", BODIES)
def test_hostile_numbers_in_every_numeric_field(client: httpx.Client, route: str) -> None:
    for path in numeric_fields(route):
        body = with_value(BODIES[route], path, _PLACEHOLDER)
        for literal in NON_FINITE:
            r = client.post(route, content=raw_body(body, literal.encode()))
            message = refused(route, r, f"{dotted(path)} = {literal}", "not a finite number")
            assert message.startswith(dotted(path)), message
        for literal in FINITE:
            r = client.post(route, content=raw_body(body, literal.encode()))
            answered(route, r, f"{dotted(path)} = {literal}")


@pytest.mark.parametrize("route", PROMPTS)
def test_invalid_utf8_is_a_400(client: httpx.Client, route: str) -> None:
    body = with_value(BODIES[route], PROMPTS[route], _PLACEHOLDER)
    for name, bad in INVALID_UTF8.items():
        r = client.post(route, content=raw_body(body, b'"a' + bad + b'b"'))
        refused(route, r, name, "not valid UTF-8")
    utf16 = raw_body(BODIES[route]).decode().encode("utf-16-le")
    refused(route, client.post(route, content=utf16), "UTF-16", "not JSON encoded as UTF-8")


@pytest.mark.parametrize("route", BODIES)
def test_deep_nesting_is_a_400_not_a_recursion_error(client: httpx.Client, route: str) -> None:
    r = client.post(route, content=b"[" * 100_000 + b"]" * 100_000)
    refused(route, r, "100,000 levels", f"more than {MAX_DEPTH} levels deep")
    body = with_value(BODIES[route], ("deep",), nested_list(MAX_DEPTH))
    r = client.post(route, content=raw_body(body))
    refused(route, r, f"{MAX_DEPTH + 1} levels", f"more than {MAX_DEPTH} levels deep")


def nested_schema(levels: int) -> dict[str, Any]:
    """A JSON Schema of objects nested `levels` deep (2 JSON levels each)."""
    s: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


# Where a door hands a client's JSON Schema to recursive code (the template's tojson, the grammar
# converter): the deepest schema the gate lets through must still get a 4xx or a 200 there.
# (route, fields added to its body, where the schema goes)
SCHEMA_PLACES: list[tuple[str, dict[str, Any], tuple[str | int, ...]]] = [
    (
        "/v1/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
        ("response_format", "json_schema", "schema"),
    ),
    (
        "/v1/chat/completions",
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
        ("tools", 0, "function", "parameters"),
    ),
    (
        "/v1/responses",
        {"text": {"format": {"type": "json_schema", "name": "n"}}},
        ("text", "format", "schema"),
    ),
    (
        "/v1/responses",
        {"tools": [{"type": "function", "name": "f"}], "tool_choice": "required"},
        ("tools", 0, "parameters"),
    ),
    (
        "/v1/messages",
        {"tools": [{"name": "f"}], "tool_choice": {"type": "any"}},
        ("tools", 0, "input_schema"),
    ),
    ("/v1/messages", {"output_format": {"type": "json_schema"}}, ("output_format", "schema")),
    ("/v1/messages/count_tokens", {"tools": [{"name": "f"}]}, ("tools", 0, "input_schema")),
    ("/api/chat", {}, ("format",)),
    ("/api/generate", {}, ("format",)),
]


@pytest.mark.parametrize(("route", "extra", "at"), SCHEMA_PLACES)
def test_schemas_as_deep_as_allowed_are_answered(
    client: httpx.Client, route: str, extra: dict[str, Any], at: tuple[str | int, ...]
) -> None:
    base = {**BODIES[route], **extra}
    levels = 1
    while depth(with_value(base, at, nested_schema(levels + 1))) <= MAX_DEPTH:
        levels += 1
    body = with_value(base, at, nested_schema(levels))
    assert depth(body) >= MAX_DEPTH - 1  # as deep as the gate allows (2 levels per object)
    answered(route, client.post(route, content=raw_body(body)), f"schema at {dotted(at)}")


@pytest.mark.parametrize("route", PROMPTS)
def test_one_megabyte_single_token(client: httpx.Client, server: Running, route: str) -> None:
    for token in ("a" * (1 << 20), "\u00e9" * (1 << 19)):  # 1 MB of one byte, of a 2-byte char
        started = time.perf_counter()
        r = client.post(route, content=raw_body(with_value(BODIES[route], PROMPTS[route], token)))
        took = time.perf_counter() - started
        message = answered(route, r, "1 MB single token")
        if route == "/v1/messages/count_tokens":
            assert r.status_code == 200 and r.json()["input_tokens"] > 1000  # a count is right
        else:
            assert message is not None and r.status_code in (400, 413), (route, r.text[:300])
        assert took < 60, f"{route}: {took:.1f}s for a 1 MB token"
        assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def test_a_binary_upload_reaches_its_route(client: httpx.Client) -> None:
    """Only JSON is checked: Ollama's blob upload still gets its own answer (use the CLI)."""
    blob = b"GGUF\x03\x00\x00\x00\xff\xfe\x00" * 100
    r = client.post("/api/blobs/sha256:" + "0" * 64, content=blob)
    assert r.status_code == 404 and "freehold" in error_message("/api/blobs", r), r.text


@pytest.mark.parametrize(("method", "route"), PATH_ROUTES)
def test_hostile_text_in_path_parameters(client: httpx.Client, method: str, route: str) -> None:
    for name, text in HOSTILE_TEXTS.items():
        # Percent-encoded as the bytes a client would send (a lone surrogate as CESU-8 bytes).
        segment = quote(text.encode("utf-8", "surrogatepass"), safe="")
        r = client.request(method, route.format(segment))
        assert r.status_code == 404, (route, name, r.status_code, r.text)
        error_message(route, r)
    for name, bad in INVALID_UTF8.items():
        r = client.request(method, route.format(quote(b"a" + bad, safe="")))
        assert r.status_code == 404, (route, name, r.status_code, r.text)


def test_hostile_text_in_a_batch(client: httpx.Client) -> None:
    """Hostile text in an uploaded batch file and in a batch's fields: a clear 4xx, or a batch
    whose bad lines land in its error file; never a 5xx."""
    for name, text in HOSTILE_TEXTS.items():
        line = {"custom_id": text, "method": "POST", "url": "/v1/chat/completions", "body": {}}
        upload = raw_body(line) + b"\n"
        r = httpx.post(  # multipart: not the module client's JSON content type
            f"{client.base_url}/v1/files",
            files={"file": ("in.jsonl", upload, "application/jsonl")},
            data={"purpose": "batch"},
            timeout=TIMEOUT_S,
        )
        assert r.status_code in (200, 400), (name, r.status_code, r.text)
        if r.status_code != 200:
            error_message("/v1/files", r)
            continue
        body = {
            "input_file_id": r.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"note": text},
        }
        r = client.post("/v1/batches", content=raw_body(body))
        assert r.status_code in (200, 400), (name, r.status_code, r.text)
        if r.status_code == 400:
            error_message("/v1/batches", r)


def test_the_server_is_up_and_accounted_for_everything(
    client: httpx.Client, server: Running
) -> None:
    """Runs last: after every hostile request above, the server answers, and every request it
    admitted has both its ledger row and its audit line (the writers never failed)."""
    r = client.post("/v1/chat/completions", content=raw_body(BODIES["/v1/chat/completions"]))
    assert r.status_code == 200, r.text
    s = server.services
    assert s.ledger.flush() and s.audit.flush()
    assert s.ledger._thread.is_alive() and s.audit._thread.is_alive()
    lines = (server.home / "audit.jsonl").read_bytes().decode("utf-8").splitlines()
    entries = [json.loads(x) for x in lines]
    with sqlite3.connect(server.home / "ledger.db") as db:
        ids = {row[0] for row in db.execute("SELECT request_id FROM requests")}
    # No keys, so no refusal before admission: every line but a pull's (audited, not metered)
    # has its ledger row, and each row its line.
    assert ids == {e["request_id"] for e in entries if e["endpoint"] != "ollama.pull"}
    assert len(entries) > 500  # hundreds of hostile requests were admitted and accounted
    assert r.headers["x-request-id"] in ids
    # Hostile text that is let through is logged as sent.
    prompts = json.dumps([e.get("prompt") for e in entries], ensure_ascii=False)
    assert HOSTILE_TEXTS["right-to-left marks"] in prompts
    assert json.dumps(HOSTILE_TEXTS["NUL inside"], ensure_ascii=False)[1:-1] in prompts
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200
