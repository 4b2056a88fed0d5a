"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), driven by the official
`anthropic` SDK and raw HTTP against a real server on SmolLM2."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from server_harness import Running, running_server

from freehold.config import paths
from freehold.engine import split_reply
from freehold.server.anthropic import messages as messages_route
from freehold.server.anthropic.protocol import MessagesRequest, ToolUseOut
from freehold.server.anthropic.stream import MessageEvents
from freehold.server.auth import KeyStore
from freehold.server.errors import APIError, validation_message

CHAT = "smollm2"
OTHER = "other"  # the same GGUF served under a second id
ALIAS = "claude-sonnet-4-6"
SECRET_PROMPT = "crimson-otter-5521 confidential"
HI = [{"role": "user", "content": "Say hi"}]
# The SDK (2.x) no longer has sampling arguments; older clients and Claude Code still send them.
GREEDY = {"temperature": 0, "top_k": 1}
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("anthropic-home")


@pytest.fixture(scope="module")
def secrets(home: Path) -> dict[str, str]:
    with KeyStore(paths(home).keys) as store:
        return {
            "all": store.create("all")[1],
            "chat-only": store.create("chat-only", models=[CHAT])[1],
            "slow": store.create("slow", rpm=1)[1],
            "acct": store.create("acct")[1],
        }


@pytest.fixture(scope="module")
def server(home: Path, secrets: dict[str, str], smollm2_path: Path) -> Running:
    models = {CHAT: smollm2_path, OTHER: smollm2_path}
    ready = {"x-api-key": secrets["all"]}
    with running_server(
        home,
        models,
        ready_headers=ready,
        slots=2,
        ctx=1024,
        aliases={ALIAS: CHAT},
        max_body_bytes=1 << 20,
    ) as s:
        yield s


def _client(server: Running, secret: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key=secret, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def client(server: Running, secrets: dict[str, str]) -> anthropic.Anthropic:
    return _client(server, secrets["all"])


def _post(server: Running, secret: str, body: Any, path: str = "/v1/messages") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"x-api-key": secret, "content-type": "application/json"}
    return httpx.post(server.base + path, content=content, headers=headers, timeout=120)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event."""
    out = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def check_order(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Anthropic's event grammar; returns the content blocks as started."""
    names = [name for name, _ in events if name != "ping"]
    assert all(name == data["type"] for name, data in events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks: list[dict[str, Any]] = []
    open_index = None
    for name, data in events[1:]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            open_index = data["index"]
            blocks.append(data["content_block"])
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        elif name == "message_delta":
            assert open_index is None  # every start had its stop
    return blocks


# -- the SDK -----------------------------------------------------------------------------------


def test_create_returns_text_and_integer_usage(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model=CHAT, max_tokens=16, messages=HI)
    m = raw.parse()
    assert raw.headers["request-id"] and m.id.startswith("msg_")
    assert m.type == "message" and m.role == "assistant" and m.model == CHAT
    assert [b.type for b in m.content] == ["text"] and m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    u = m.usage
    for n in (u.input_tokens, u.output_tokens, u.cache_read_input_tokens):
        assert isinstance(n, int) and n >= 0
    assert u.cache_creation_input_tokens == 0
    assert u.input_tokens + u.cache_read_input_tokens > 5 and 1 <= u.output_tokens <= 16


def test_stream_is_accumulated_by_the_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=CHAT, max_tokens=12, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == text and text
    assert 1 <= final.usage.output_tokens <= 12
    counted = client.messages.count_tokens(model=CHAT, messages=HI).input_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == counted


def test_stream_events_in_order(
    server: Running, secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pings come while the prompt prefills: make that long enough to see one.
    monkeypatch.setattr(messages_route, "PING_EVERY_S", 0.0005)
    system = "You answer questions about the ocean, its tides and its fish. " * 20
    body = {"model": CHAT, "max_tokens": 10, "stream": True, "system": system, "messages": HI}
    r = _post(server, secrets["all"], body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert any(name == "ping" for name, _ in events)
    blocks = check_order(events)
    assert blocks == [{"type": "text", "text": ""}]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] > 0
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    usage = delta["usage"]
    assert (
        usage["input_tokens"] + usage["cache_read_input_tokens"] == start["usage"]["input_tokens"]
    )
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text and usage["output_tokens"] >= 1


def test_stop_sequence_and_max_tokens(client: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "Write three sentences about the sea."}]
    m = client.messages.create(
        model=CHAT, max_tokens=40, messages=ask, stop_sequences=[" "], extra_body=GREEDY
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == " "
    assert " " not in m.content[0].text
    with client.messages.stream(
        model=CHAT, max_tokens=40, messages=ask, stop_sequences=[" "], extra_body=GREEDY
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == " "
    cut = client.messages.create(model=CHAT, max_tokens=2, messages=ask, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


def test_reply_cut_by_the_context_end(client: anthropic.Anthropic) -> None:
    # ~990 prompt tokens in a 1024-token context: max_tokens=32000 is capped, not refused, and
    # the reply ends at the context's end, which the stop reason says.
    system = "The sea is wide and deep. " * 140
    story = [{"role": "user", "content": "Write a very long story about the sea."}]
    n = client.messages.count_tokens(model=CHAT, system=system, messages=story).input_tokens
    assert 950 < n < 1010
    m = client.messages.create(
        model=CHAT, max_tokens=32000, system=system, messages=story, extra_body=GREEDY
    )
    assert m.stop_reason == "model_context_window_exceeded"
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens + m.usage.output_tokens == 1024


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    forced = {"type": "tool", "name": "get_weather"}
    m = client.messages.create(
        model=CHAT, max_tokens=60, messages=[ask], tools=[WEATHER], tool_choice=forced
    )
    assert m.stop_reason == "tool_use"
    use = m.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input, dict) and isinstance(use.input["city"], str)
    # The result goes back in a user turn that also has text: both reach the model.
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"}
    back = [
        ask,
        m.to_param(),
        {"role": "user", "content": [result, {"type": "text", "text": "Thanks!"}]},
    ]
    reply = client.messages.create(model=CHAT, max_tokens=20, messages=back, tools=[WEATHER])
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # A failed call, as blocks, is accepted the same way.
    failed = {**result, "is_error": True, "content": [{"type": "text", "text": "no network"}]}
    back[-1] = {"role": "user", "content": [failed]}
    assert client.messages.create(model=CHAT, max_tokens=5, messages=back, tools=[WEATHER])


def test_streamed_tool_use(
    client: anthropic.Anthropic, server: Running, secrets: dict[str, str]
) -> None:
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    forced = {"type": "tool", "name": "get_weather"}
    with client.messages.stream(
        model=CHAT, max_tokens=60, messages=ask, tools=[WEATHER], tool_choice=forced
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use" and isinstance(final.content[-1].input, dict)
    body = {
        "model": CHAT,
        "max_tokens": 60,
        "stream": True,
        "messages": ask,
        "tools": [WEATHER],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    events = sse_events(_post(server, secrets["all"], body).text)
    blocks = check_order(events)
    assert blocks[-1]["type"] == "tool_use" and blocks[-1]["input"] == {}
    partial = "".join(
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    )
    assert isinstance(json.loads(partial), dict)


def test_text_streams_early_with_tools_offered(server: Running, secrets: dict[str, str]) -> None:
    # Claude Code always sends tools: prose streams as it comes, not at the end of the reply.
    ask = [{"role": "user", "content": "Name three colours."}]
    body = {"model": CHAT, "max_tokens": 12, "stream": True, "messages": ask, "tools": [WEATHER]}
    events = sse_events(_post(server, secrets["all"], {**body, **GREEDY}).text)
    assert check_order(events) == [{"type": "text", "text": ""}]
    texts = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert len(texts) >= 4, texts  # token by token, not one delta at the end


def test_count_tokens_counts_what_messages_prefills(client: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    bare = client.messages.count_tokens(model=CHAT, messages=HI).input_tokens
    full = client.messages.count_tokens(
        model=CHAT, messages=HI, system=system, tools=[WEATHER]
    ).input_tokens
    assert 0 < bare < full
    m = client.messages.create(
        model=CHAT, max_tokens=1, messages=HI, system=system, tools=[WEATHER]
    )
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == full


# -- keys, limits, models ----------------------------------------------------------------------


def test_bad_or_missing_key(server: Running) -> None:
    with pytest.raises(anthropic.AuthenticationError) as e:
        _client(server, "fh-wrong").messages.create(model=CHAT, max_tokens=1, messages=HI)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(server.base + "/v1/messages", json={"model": CHAT}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_bearer_auth_works(server: Running, secrets: dict[str, str]) -> None:
    c = anthropic.Anthropic(
        base_url=server.base, auth_token=secrets["all"], api_key=None, max_retries=0
    )
    assert c.messages.create(model=CHAT, max_tokens=1, messages=HI).usage.output_tokens == 1


def test_key_over_its_rpm(server: Running, secrets: dict[str, str]) -> None:
    slow = _client(server, secrets["slow"])
    slow.messages.create(model=CHAT, max_tokens=1, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as e:
        slow.messages.create(model=CHAT, max_tokens=1, messages=HI)
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["error"]["type"] == "rate_limit_error"


def test_key_limited_to_a_model(server: Running, secrets: dict[str, str]) -> None:
    limited = _client(server, secrets["chat-only"])
    assert limited.messages.create(model=ALIAS, max_tokens=1, messages=HI).model == ALIAS
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        limited.messages.create(model=OTHER, max_tokens=1, messages=HI)
    assert e.value.body["error"]["type"] == "permission_error"
    assert OTHER in e.value.body["error"]["message"]
    with pytest.raises(anthropic.PermissionDeniedError):
        limited.messages.count_tokens(model=OTHER, messages=HI)


def test_alias_and_unknown_model(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=ALIAS, max_tokens=2, messages=HI)
    assert m.model == ALIAS  # echoed as the client named it
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-opus-4-7", max_tokens=1, messages=HI)
    message = e.value.body["error"]["message"]
    assert e.value.body["error"]["type"] == "not_found_error"
    assert "claude-opus-4-7" in message and CHAT in message and OTHER in message


def test_beta_route_and_headers(client: anthropic.Anthropic) -> None:
    # The SDK's beta namespace posts to /v1/messages?beta=true with an anthropic-beta header.
    m = client.beta.messages.create(
        model=CHAT, max_tokens=2, messages=HI, betas=["context-management-2025-06-27"]
    )
    assert m.content[0].type == "text"
    n = client.beta.messages.count_tokens(model=CHAT, messages=HI, betas=["token-counting"])
    assert n.input_tokens > 0


def test_claude_code_shaped_request(server: Running, secrets: dict[str, str]) -> None:
    """What Claude Code sends: system blocks with cache_control, a JSON-string user id, thinking,
    context management, server tools, max_tokens far beyond the context, and some field
    from a future beta."""
    body = {
        "model": ALIAS,
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are a CLI.", "cache_control": {"type": "ephemeral"}},
            {
                "type": "text",
                "text": "Be brief.",
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            },
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                    {"type": "text", "text": "Say hi", "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
        "tools": [WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "metadata": {"user_id": json.dumps({"device_id": "ab" * 32, "session_id": "s-1"})},
        "thinking": {"type": "enabled", "budget_tokens": 31999, "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "some_future_beta": {"x": 1},
    }
    r = _post(server, secrets["all"], body, "/v1/messages?beta=true")
    assert r.status_code == 200, r.text
    assert r.headers["x-freehold-left-out-tools"] == "web_search_20250305"
    ignored = r.headers["x-freehold-ignored-fields"].split(",")
    assert set(ignored) == {"thinking", "context_management", "some_future_beta"}
    events = sse_events(r.text)
    check_order(events)
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] in (
        "end_turn",
        "tool_use",
        "model_context_window_exceeded",
    )


def test_prompt_longer_than_the_context(client: anthropic.Anthropic) -> None:
    system = "The quick brown fox jumps over the lazy dog. " * 300  # ~3000 tokens > 1024
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(
                model=CHAT, max_tokens=10, system=system, messages=HI, stream=stream
            )
        error = e.value.body["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("prompt is too long: ")
        assert "> 1023 maximum" in error["message"]
    # Counting is still possible: the client learns by how much it is over.
    assert client.messages.count_tokens(model=CHAT, system=system, messages=HI).input_tokens > 1024


# -- refusals ----------------------------------------------------------------------------------


def test_image_block_refused(client: anthropic.Anthropic) -> None:
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
    }
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=CHAT,
            max_tokens=5,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}],
        )
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert (
        "'image'" in e.value.body["error"]["message"] and "text" in e.value.body["error"]["message"]
    )


def test_body_too_large(server: Running, secrets: dict[str, str]) -> None:
    with pytest.raises(anthropic.RequestTooLargeError) as e:
        _client(server, secrets["all"]).messages.create(
            model=CHAT, max_tokens=1, messages=[{"role": "user", "content": "x" * (2 << 20)}]
        )
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "request_too_large"


_OK = {"model": CHAT, "max_tokens": 5, "messages": HI}
MALFORMED = {
    "missing max_tokens": {"model": CHAT, "messages": HI},
    "max_tokens not an int": {**_OK, "max_tokens": "ten"},
    "max_tokens zero": {**_OK, "max_tokens": 0},
    "missing model": {"max_tokens": 5, "messages": HI},
    "messages not a list": {**_OK, "messages": "hi"},
    "no messages": {**_OK, "messages": []},
    "message not an object": {**_OK, "messages": ["hi"]},
    "message without blocks": {**_OK, "messages": [{"role": "user", "content": []}]},
    "unknown role": {**_OK, "messages": [{"role": "tool", "content": "x"}]},
    "unknown block type": {
        **_OK,
        "messages": [{"role": "user", "content": [{"type": "hologram", "text": "x"}]}],
    },
    "block without type": {**_OK, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
    "unknown field in a block": {
        **_OK,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "bold": True}]}],
    },
    "tool_use in a user turn": {
        **_OK,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
            }
        ],
    },
    "tool_use input not an object": {
        **_OK,
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": 3}],
            },
            {"role": "user", "content": "y"},
        ],
    },
    "document in a tool result": {
        **_OK,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document"}]}
                ],
            }
        ],
    },
    "final assistant turn (prefill)": {
        **_OK,
        "messages": [*HI, {"role": "assistant", "content": "Hello"}],
    },
    "temperature above 1": {**_OK, "temperature": 1.5},
    "top_k negative": {**_OK, "top_k": -1},
    "stop_sequences not a list": {**_OK, "stop_sequences": 5},
    "system a number": {**_OK, "system": 7},
    "tool without input_schema": {**_OK, "tools": [{"name": "f"}]},
    "tool name with spaces": {**_OK, "tools": [{**WEATHER, "name": "get weather"}]},
    "tool_choice names no tool": {
        **_OK,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "nope"},
    },
    "tool_choice any without tools": {**_OK, "tool_choice": {"type": "any"}},
    "unknown tool_choice": {**_OK, "tools": [WEATHER], "tool_choice": {"type": "sometimes"}},
    "metadata with other fields": {**_OK, "metadata": {"user_id": "u", "team": "x"}},
    "mcp servers": {**_OK, "mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]},
    "stream not a bool": {**_OK, "stream": "yes please"},
    "body not an object": [_OK],
    "invalid JSON": b'{"model": "smollm2", "max_tokens": 5, "messages": [',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_400_in_anthropic_shape(
    server: Running, secrets: dict[str, str], case: str
) -> None:
    r = _post(server, secrets["all"], MALFORMED[case])
    assert r.status_code == 400, (case, r.text)
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": CHAT, "messages": "hi"},
        {"model": CHAT, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        b"not json",
    ],
)
def test_malformed_count_tokens(server: Running, secrets: dict[str, str], body: Any) -> None:
    r = _post(server, secrets["all"], body, "/v1/messages/count_tokens")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_under_messages(server: Running, secrets: dict[str, str]) -> None:
    r = httpx.get(server.base + "/v1/messages/batches", headers={"x-api-key": secrets["all"]})
    assert r.status_code in (404, 405) and r.json()["type"] == "error"


# -- accounting --------------------------------------------------------------------------------


def test_ledger_rows_and_audit_without_prompt_text(
    server: Running, secrets: dict[str, str], home: Path
) -> None:
    acct = _client(server, secrets["acct"])
    ask = [{"role": "user", "content": SECRET_PROMPT}]
    made = acct.messages.create(
        model=CHAT, max_tokens=4, messages=ask, metadata={"user_id": "user-42"}
    )
    with acct.messages.stream(model=CHAT, max_tokens=4, messages=ask) as stream:
        streamed = stream.get_final_message()
    acct.messages.count_tokens(model=CHAT, messages=ask, system=SECRET_PROMPT)
    assert server.services.ledger.flush() and server.services.audit.flush()

    with sqlite3.connect(paths(home).ledger) as db:
        rows = db.execute(
            "SELECT endpoint, model, prompt_tokens, cached_tokens, completion_tokens, status, "
            "user FROM requests WHERE key_name = 'acct' ORDER BY id"
        ).fetchall()
    assert [r[0] for r in rows] == ["messages", "messages", "count_tokens"]
    for (_, model, prompt, cached, completion, status, _), m in zip(
        rows, (made, streamed), strict=False
    ):
        assert model == CHAT and status == 200
        assert prompt == m.usage.input_tokens + m.usage.cache_read_input_tokens
        assert cached == m.usage.cache_read_input_tokens
        assert completion == m.usage.output_tokens
    assert rows[0][6] == "user-42"

    audit = paths(home).audit_log.read_text()
    assert "crimson-otter" not in audit
    mine = [e for e in map(json.loads, audit.splitlines()) if e.get("key") == "acct"]
    assert [e["endpoint"] for e in mine] == ["messages", "messages", "count_tokens"]
    assert all(len(e["prompt_sha256"]) == 64 and "prompt" not in e for e in mine)


# -- pure logic: blocks from a reply, and the error event ---------------------------------------


def test_calls_become_tool_use_blocks() -> None:
    # Which replies are calls is the engine's (tests/test_tool_replies.py); here, their shape.
    text, calls = split_reply(
        'Sure. <tool_call>{"name": "f", "arguments": {"a": 2}}</tool_call>', {"f"}
    )
    (use,) = [ToolUseOut.of(c) for c in calls]
    assert text == "Sure." and use.name == "f" and use.input == {"a": 2}
    assert use.id.startswith("toolu_") and len(use.id) > len("toolu_")
    assert json.loads(use.input_json) == {"a": 2}


def test_error_event_shape() -> None:
    ev = MessageEvents("msg_1", CHAT).error(APIError(503, "the server is shutting down"))
    ((name, data),) = sse_events(ev.decode())
    assert name == "error"
    assert data == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the server is shutting down"},
    }


# -- property: any body the request model accepts is one the engine accepts -------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_text_block = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=12)})
_tool_use = st.fixed_dictionaries(
    {
        "type": st.just("tool_use"),
        "id": st.text(min_size=1, max_size=4),
        "name": st.sampled_from(["f", "g"]),
        "input": st.dictionaries(st.text(max_size=4), _json, max_size=2),
    }
)
_tool_result = st.fixed_dictionaries(
    {
        "type": st.just("tool_result"),
        "tool_use_id": st.text(min_size=1, max_size=4),
        "content": st.text(max_size=8) | st.lists(_text_block, max_size=2),
        "is_error": st.booleans(),
    }
)
_odd_block = st.fixed_dictionaries(
    {"type": st.sampled_from(["thinking", "redacted_thinking", "image", "x"])},
    optional={"thinking": st.text(max_size=4), "data": st.text(max_size=4)},
)
_hostile = st.lists(_odd_block | _json, min_size=1, max_size=2)


def _turn(role: str, odd_role: str, *blocks: st.SearchStrategy) -> st.SearchStrategy:
    """A message: mostly well formed, sometimes with an odd role or block."""
    good = st.lists(st.one_of(*blocks), min_size=1, max_size=3)
    odd = good.flatmap(lambda g: _hostile.map(lambda h: g + h))
    return st.fixed_dictionaries(
        {
            "role": st.sampled_from([role] * 9 + [odd_role]),
            "content": st.one_of(st.text(max_size=12), good, good, good, good, good, odd),
        }
    )


_user = _turn("user", "system", _text_block, _tool_result)
_assistant = _turn("assistant", "tool", _text_block, _tool_use)
_custom_tool = st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g"]), "input_schema": st.just({"type": "object"})},
    optional={"description": st.text(max_size=6), "cache_control": st.just({"type": "ephemeral"})},
)
_tool = st.one_of(
    _custom_tool,
    _custom_tool,
    st.fixed_dictionaries({"type": st.text(max_size=12)}, optional={"name": st.text(max_size=4)}),
    st.fixed_dictionaries({"name": st.just("bad name"), "input_schema": st.just({})}),
    _json,
)
_body = st.fixed_dictionaries(
    {
        "model": st.just(CHAT),
        "max_tokens": st.integers(-1, 40000),
        "messages": st.lists(st.tuples(_user, _assistant), min_size=1, max_size=3).map(
            lambda turns: [m for pair in turns for m in pair][:-1]  # ends with a user turn
        ),
    },
    optional={
        "system": st.text(max_size=8) | st.lists(_text_block, max_size=2),
        "tools": st.lists(_custom_tool, min_size=1, max_size=2) | st.lists(_tool, max_size=3),
        "tool_choice": st.fixed_dictionaries(
            {"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
            optional={"name": st.sampled_from(["f", "g", "h"])},
        ),
        "temperature": st.floats(-0.5, 1.5),
        "top_p": st.floats(-0.5, 1.5),
        "top_k": st.integers(-2, 100),
        "stop_sequences": st.lists(st.text(max_size=3), max_size=20),
        "metadata": st.fixed_dictionaries({"user_id": st.text(max_size=300)}),
        "thinking": _json,
        "stream": st.booleans(),
    },
).flatmap(
    lambda d: st.dictionaries(st.text(max_size=8), _json, max_size=2).map(lambda x: {**x, **d})
)


@settings(max_examples=300, deadline=None)
@given(_body)
def test_request_model_accepts_only_what_the_engine_can_run(body: dict[str, Any]) -> None:
    try:
        req = MessagesRequest.model_validate(body)
    except ValidationError as e:
        message, _ = validation_message(RequestValidationError(e.errors()))
        assert message
        return
    req.to_sampling_params().validate()  # never an engine-side refusal of a sampling field
    messages = req.template_messages()
    assert messages and messages[-1]["role"] != "assistant"
    assert {m["role"] for m in messages} <= {"system", "user", "assistant", "tool"}
    assert all(isinstance(m["content"], str) for m in messages)
    for header in (req.ignored_fields(), req.left_out_tools):
        ",".join(header).encode("ascii")  # header-safe
        assert all(name and "," not in name for name in header)
