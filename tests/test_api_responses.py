"""OpenAI's Responses API (`/v1/responses`), driven by the official `openai` SDK on SmolLM2."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import BadRequestError, NotFoundError, OpenAI, PermissionDeniedError
from pydantic import ValidationError
from server_harness import Running, running_server

from freehold.config import paths
from freehold.server.auth import KeyStore
from freehold.server.responses.protocol import ResponseRequest, template_messages

MODEL = "smollm2"
SPARE = "spare"  # the same weights under a second id, loaded only on demand
SECRET = "teal-otter-5519 classified"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    },
    "strict": True,
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_DONE = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def keyed_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("responses-home")


@pytest.fixture(scope="module")
def secrets(keyed_home: Path) -> dict[str, str]:
    with KeyStore(paths(keyed_home).keys) as store:
        return {
            name: store.create(name, models=models)[1]
            for name, models in [
                ("ada", None),
                ("bob", None),
                ("acct", None),
                ("spare-only", [SPARE]),
            ]
        }


@pytest.fixture(scope="module")
def server(keyed_home: Path, secrets: dict[str, str], smollm2_path: Path) -> Running:
    """Keys and the response store on."""
    auth = {"Authorization": f"Bearer {secrets['ada']}"}
    models = {MODEL: smollm2_path, SPARE: smollm2_path}
    with running_server(
        keyed_home, models, ready_headers=auth, slots=2, eager=[MODEL], store_responses=True
    ) as s:
        yield s


@pytest.fixture(scope="module")
def open_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Running:
    """No keys, no store: the defaults."""
    home = tmp_path_factory.mktemp("responses-open")
    with running_server(home, {MODEL: smollm2_path}, slots=2) as s:
        yield s


def _client(server: Running, secret: str = "unused") -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=secret, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def ada(server: Running, secrets: dict[str, str]) -> OpenAI:
    return _client(server, secrets["ada"])


@pytest.fixture(scope="module")
def client(open_server: Running) -> OpenAI:
    return _client(open_server)


# -- plain and streamed ------------------------------------------------------------------------


def test_plain(client: OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=24, temperature=0
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.model == MODEL and r.status in ("completed", "incomplete")
    assert r.output_text.strip()
    (msg,) = r.output
    assert msg.type == "message" and msg.id.startswith("msg_") and msg.role == "assistant"
    u = r.usage
    assert all(isinstance(v, int) for v in (u.input_tokens, u.output_tokens, u.total_tokens))
    assert 0 < u.output_tokens <= 24 and u.total_tokens == u.input_tokens + u.output_tokens
    assert isinstance(u.input_tokens_details.cached_tokens, int)
    assert u.output_tokens_details.reasoning_tokens == 0
    assert r.store is False  # this server keeps nothing
    assert r.temperature == 0 and r.max_output_tokens == 24 and r.tools == []


def test_items_instructions_and_roles(client: OpenAI) -> None:
    r = client.responses.create(
        model=MODEL,
        instructions="Answer in one word.",
        input=[
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Capital of France?"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Paris.", "annotations": []}],
            },
            {"role": "user", "content": "And of Italy?"},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert r.output_text.strip() and r.instructions == "Answer in one word."


def test_streamed_event_order(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL, input="Say hello.", max_output_tokens=24, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    n = kinds.count("response.output_text.delta")
    assert n >= 1
    final = "response.completed" if kinds[-1] == "response.completed" else "response.incomplete"
    assert kinds == TEXT_EVENTS + ["response.output_text.delta"] * n + TEXT_DONE + [final]
    done = events[-1].response
    assert done.status == final.removeprefix("response.")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == done.output_text == events[-4].text
    item_id = events[2].item.id
    assert item_id.startswith("msg_") and done.output[0].id == item_id
    assert all(e.item_id == item_id for e in events if e.type == "response.output_text.delta")
    assert events[0].response.id == done.id and events[0].response.status == "in_progress"
    assert done.usage.output_tokens > 0


def test_sse_framing_names_every_event(open_server: Running) -> None:
    body = {
        "model": MODEL,
        "input": "Hi",
        "max_output_tokens": 4,
        "stream": True,
        "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}],
    }
    with httpx.stream("POST", open_server.v1 + "/responses", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["x-freehold-ignored-tools"] == "code_interpreter"
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f.strip() and not f.startswith(":")]
    for frame in frames:
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")
    assert "[DONE]" not in raw


def test_stream_helper_accumulates(client: OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input="Say hello.", max_output_tokens=64, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)


def test_max_output_tokens_hit_is_incomplete(client: OpenAI) -> None:
    ask = "Write a long story about a dragon."
    r = client.responses.create(model=MODEL, input=ask, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    events = list(client.responses.create(model=MODEL, input=ask, max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


# -- tools and formats -------------------------------------------------------------------------


def test_function_call_round_trip(client: OpenAI) -> None:
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    forced = {"type": "function", "name": "get_weather"}
    r = client.responses.create(
        model=MODEL,
        input=[ask],
        tools=[WEATHER],
        tool_choice=forced,
        max_output_tokens=64,
        temperature=0,
    )
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert r.tool_choice.name == "get_weather" and r.tools[0].name == "get_weather"
    back = client.responses.create(
        model=MODEL,
        input=[
            ask,
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
        max_output_tokens=24,
        temperature=0,
    )
    assert back.status in ("completed", "incomplete") and back.usage.input_tokens > 0


def test_function_call_streamed(client: OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL,
            input="What is the weather in Rome?",
            tools=[WEATHER],
            tool_choice="required",
            max_output_tokens=64,
            temperature=0,
            stream=True,
        )
    )
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, delta, done = events[2], events[3], events[4]
    assert added.item.type == "function_call" and added.item.arguments == ""
    assert delta.item_id == done.item_id == added.item.id and delta.delta == done.arguments
    final = events[-1].response.output[0]
    assert final.arguments == done.arguments and json.loads(final.arguments)["city"]


def test_text_streams_early_with_tools_offered(client: OpenAI) -> None:
    # Codex always sends tools: prose streams as it comes (it times out on a silent stream).
    events = list(
        client.responses.create(
            model=MODEL,
            input="Name three colours.",
            tools=[WEATHER],
            max_output_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 4, deltas  # token by token, not one delta at the end
    assert kinds[:4] == TEXT_EVENTS and kinds[-4:-1] == TEXT_DONE
    assert kinds[-1] in ("response.completed", "response.incomplete")
    final = events[-1].response
    assert [item.type for item in final.output] == ["message"]
    assert "".join(deltas) == final.output_text == events[-4].text


def test_json_schema_output_validates(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL,
        input="Invent a person: give a name and an age.",
        text={
            "format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
        },
        max_output_tokens=96,
        temperature=0,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_hosted_tools_are_left_out_and_named(client: OpenAI) -> None:
    tools = [
        {"type": "web_search"},
        WEATHER,
        {"type": "namespace", "name": "mcp", "description": "x", "tools": []},
        {"type": "web_search"},
    ]
    raw = client.responses.with_raw_response.create(
        model=MODEL,
        input="Hi",
        tools=tools,
        tool_choice="auto",
        max_output_tokens=8,
        # What Codex CLI sends besides: accepted, ignored.
        reasoning={"effort": "medium", "summary": "auto"},
        include=["reasoning.encrypted_content"],
        prompt_cache_key="conversation-1",
        store=False,
        parallel_tool_calls=False,
        extra_body={"client_metadata": {"session": "s1"}},
    )
    assert raw.headers["x-freehold-ignored-tools"] == "web_search, namespace"
    r = raw.parse()
    assert [t.type for t in r.tools] == ["function"] and r.parallel_tool_calls is False
    only_hosted = client.responses.with_raw_response.create(
        model=MODEL, input="Hi", tools=[{"type": "file_search"}], max_output_tokens=4
    )
    assert only_hosted.headers["x-freehold-ignored-tools"] == "file_search"
    assert only_hosted.parse().output_text is not None
    plain = client.responses.with_raw_response.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert "x-freehold-ignored-tools" not in plain.headers


# -- the store ---------------------------------------------------------------------------------


def test_store_off_refuses_previous_response_id(client: OpenAI, open_server: Running) -> None:
    with pytest.raises(BadRequestError) as e:
        client.responses.create(
            model=MODEL, input="Hi", previous_response_id="resp_abc", max_output_tokens=4
        )
    assert "--store-responses" in e.value.message and e.value.body["param"] == (
        "previous_response_id"
    )
    with pytest.raises(NotFoundError) as e:
        client.responses.retrieve("resp_abc")
    assert "--store-responses" in e.value.message
    with pytest.raises(NotFoundError):
        client.responses.delete("resp_abc")
    assert not (open_server.home / "responses.db").exists()


def test_previous_response_id_chains(ada: OpenAI, server: Running) -> None:
    first = ada.responses.create(
        model=MODEL,
        instructions="You are a helpful assistant.",
        input="My favourite colour is teal.",
        max_output_tokens=8,
        temperature=0,
        metadata={"ticket": "42"},
    )
    assert first.store is True and first.metadata == {"ticket": "42"}
    second = ada.responses.create(
        model=MODEL,
        input="What is my favourite colour?",
        previous_response_id=first.id,
        max_output_tokens=8,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    alone = ada.responses.create(
        model=MODEL, input="What is my favourite colour?", max_output_tokens=1, store=False
    )
    assert alone.store is False
    # The earlier turn (question and answer) is in the prompt; its instructions are not.
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    third = ada.responses.create(
        model=MODEL, input="Thanks.", previous_response_id=second.id, max_output_tokens=2
    )
    assert third.usage.input_tokens > second.usage.input_tokens
    got = ada.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    assert got.usage.input_tokens == second.usage.input_tokens
    with pytest.raises(NotFoundError):
        ada.responses.retrieve(alone.id)  # store: false keeps nothing
    db = server.home / "responses.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    ada.responses.delete(first.id)
    with pytest.raises(BadRequestError) as e:  # the chain now has a hole
        ada.responses.create(model=MODEL, input="x", previous_response_id=third.id)
    assert first.id in e.value.message


def test_stored_responses_belong_to_their_key(
    ada: OpenAI, server: Running, secrets: dict[str, str]
) -> None:
    r = ada.responses.create(model=MODEL, input="Hello", max_output_tokens=4, stream=True)
    created = [e for e in r][-1].response
    assert created.store is True
    bob = _client(server, secrets["bob"])
    with pytest.raises(NotFoundError):
        bob.responses.retrieve(created.id)
    with pytest.raises(NotFoundError):
        bob.responses.delete(created.id)
    with pytest.raises(BadRequestError) as e:
        bob.responses.create(model=MODEL, input="x", previous_response_id=created.id)
    assert e.value.body["code"] == "previous_response_not_found"
    assert ada.responses.retrieve(created.id).output_text == created.output_text
    ada.responses.delete(created.id)
    with pytest.raises(NotFoundError):
        ada.responses.retrieve(created.id)
    with pytest.raises(NotFoundError):
        ada.responses.delete(created.id)


# -- admission, accounting, bad input ----------------------------------------------------------


def test_key_limited_to_another_model_gets_403(server: Running, secrets: dict[str, str]) -> None:
    limited = _client(server, secrets["spare-only"])
    with pytest.raises(PermissionDeniedError) as e:
        limited.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert e.value.status_code == 403
    err = e.value.body
    assert err["code"] == "model_not_allowed" and err["type"] == "permission_error"
    r = httpx.post(server.v1 + "/responses", json={"model": MODEL, "input": "Hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_ledger_and_audit(server: Running, secrets: dict[str, str]) -> None:
    acct = _client(server, secrets["acct"])
    reported = [
        acct.responses.create(model=MODEL, input=SECRET, max_output_tokens=6).usage,
        [
            e
            for e in acct.responses.create(
                model=MODEL, input=SECRET, max_output_tokens=5, stream=True
            )
        ][-1].response.usage,
    ]
    assert server.services.ledger.flush() and server.services.audit.flush()
    with sqlite3.connect(server.home / "ledger.db") as db:
        rows = db.execute(
            "SELECT endpoint, status, prompt_tokens, completion_tokens FROM requests "
            "WHERE key_name = 'acct'"
        ).fetchall()
    assert [(e, s) for e, s, _, _ in rows] == [("responses", 200)] * 2
    assert sum(p for _, _, p, _ in rows) == sum(u.input_tokens for u in reported)
    assert sum(c for _, _, _, c in rows) == sum(u.output_tokens for u in reported)
    audit = (server.home / "audit.jsonl").read_text()
    assert "teal-otter" not in audit
    mine = [json.loads(line) for line in audit.splitlines() if '"acct"' in line]
    assert len(mine) == 2 and all(e["endpoint"] == "responses" for e in mine)
    assert all(len(e["prompt_sha256"]) == 64 for e in mine)


BAD_BODIES: list[tuple[str, Any, str | None]] = [
    ("missing input", {"model": MODEL}, "input"),
    ("missing model", {"input": "Hi"}, "model"),
    ("input a number", {"model": MODEL, "input": 5}, "input"),
    ("empty input", {"model": MODEL, "input": []}, "input"),
    ("item not an object", {"model": MODEL, "input": ["hi"]}, "input"),
    ("unknown item type", {"model": MODEL, "input": [{"type": "computer_call"}]}, "input"),
    ("unknown role", {"model": MODEL, "input": [{"role": "robot", "content": "x"}]}, None),
    (
        "image part",
        {
            "model": MODEL,
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
        },
        "input",
    ),
    (
        "file part",
        {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
        "input",
    ),
    (
        "function_call without call_id",
        {"model": MODEL, "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
        None,
    ),
    ("temperature a word", {"model": MODEL, "input": "x", "temperature": "hot"}, "temperature"),
    ("temperature too high", {"model": MODEL, "input": "x", "temperature": 3}, "temperature"),
    ("max_output_tokens 0", {"model": MODEL, "input": "x", "max_output_tokens": 0}, None),
    ("tools not a list", {"model": MODEL, "input": "x", "tools": "web_search"}, "tools"),
    (
        "function tool without name",
        {"model": MODEL, "input": "x", "tools": [{"type": "function"}]},
        None,
    ),
    (
        "tool_choice names a missing function",
        {
            "model": MODEL,
            "input": "x",
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "nope"},
        },
        "tool_choice",
    ),
    (
        "tool_choice required, no tools",
        {"model": MODEL, "input": "x", "tool_choice": "required"},
        "tool_choice",
    ),
    (
        "tool_choice a hosted tool",
        {"model": MODEL, "input": "x", "tool_choice": {"type": "web_search_preview"}},
        "tool_choice",
    ),
    (
        "json_schema without schema",
        {"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
        "text.format",
    ),
    (
        "json format with tools",
        {
            "model": MODEL,
            "input": "x",
            "tools": [WEATHER],
            "text": {"format": {"type": "json_object"}},
        },
        "text.format",
    ),
    ("unknown field", {"model": MODEL, "input": "x", "frobnicate": True}, "frobnicate"),
    ("background", {"model": MODEL, "input": "x", "background": True}, "background"),
    ("logprobs", {"model": MODEL, "input": "x", "top_logprobs": 3}, "top_logprobs"),
    (
        "too much metadata",
        {"model": MODEL, "input": "x", "metadata": {str(i): "v" for i in range(17)}},
        "metadata",
    ),
    ("body a list", [1, 2], None),
]


@pytest.mark.parametrize("case,body,param", BAD_BODIES, ids=[c for c, _, _ in BAD_BODIES])
def test_malformed_requests_are_400(
    open_server: Running, case: str, body: Any, param: str | None
) -> None:
    r = httpx.post(open_server.v1 + "/responses", json=body, timeout=30)
    assert r.status_code == 400, (case, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_invalid_json_and_unknown_model(open_server: Running) -> None:
    r = httpx.post(
        open_server.v1 + "/responses",
        content=b'{"model": "smollm2", "input": ',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert (
        r.status_code == 400
        and r.json()["error"]["message"] == "the request body is not valid JSON"
    )
    r = httpx.post(open_server.v1 + "/responses", json={"model": "nope", "input": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_prompt_longer_than_context_is_400(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as e:
        client.responses.create(model=MODEL, input="word " * 3000, max_output_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"


# -- the request model, under generated input --------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "input_image", "refusal", "x"])},
    optional={"text": _json, "refusal": _json},
)
_item = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["message", "function_call", "function_call_output", "reasoning", "web_search_call"]
        ),
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]),
        "content": st.text(max_size=8) | st.lists(_part, max_size=2) | _json,
        "call_id": _json,
        "name": _json,
        "arguments": _json,
        "output": _json,
    },
)
_request = st.fixed_dictionaries(
    {"model": st.just(MODEL)},
    optional={
        "input": st.text(max_size=8) | st.lists(_item, max_size=3) | _json,
        "tools": st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["function", "web_search", "mcp"])},
                optional={"name": _json, "parameters": _json},
            ),
            max_size=2,
        ),
        "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function"}]) | _json,
        "text": st.fixed_dictionaries({"format": _json}),
        "temperature": _json,
        "max_output_tokens": _json,
        "stream": _json,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_request)
def test_request_model_accepts_or_refuses_cleanly(body: dict[str, Any]) -> None:
    try:
        req = ResponseRequest.model_validate(body)
    except ValidationError:
        return  # rendered as a 400 by the app's handler
    req.to_sampling_params()
    req.echo()
    req.template_tools()
    messages = template_messages(req.instructions, req.input_items())
    assert all(m["role"] in ("system", "user", "assistant", "tool") for m in messages)
