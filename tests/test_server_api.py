"""The OpenAI-compatible API, driven by the official `openai` SDK and curl, on SmolLM2."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI
from server_harness import Running, running_server

MODEL = "smollm2"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Running:
    home = tmp_path_factory.mktemp("api-home")
    with running_server(home, {MODEL: smollm2_path}, slots=8, max_queue=64) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Running) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", timeout=180, max_retries=0)


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=_ask("Say hello."), max_tokens=16, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_completion_tokens_and_stop(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Count: one, two, three"),
        max_completion_tokens=5,
        temperature=0,
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    c = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0, stop=[" 8", "x"]
    ).choices[0]
    assert c.text == " 6, 7," and c.finish_reason == "stop"


def test_stream_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Name three colours."),
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert text.strip()
    assert 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_n_choices(client: OpenAI) -> None:
    def ask() -> list[str]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=_ask("Tell me a word."),
            max_tokens=12,
            n=2,
            temperature=1.0,
            seed=7,
        )
        assert [c.index for c in r.choices] == [0, 1]
        assert 2 <= r.usage.completion_tokens <= 24  # both choices' tokens, prompt once
        return [c.message.content for c in r.choices]

    # The first call fills the prefix cache; after it, each call finds the same cache state
    # (llama.cpp's numerics depend on how a prompt is split between cache and compute).
    ask()
    first, second = ask(), ask()
    assert first == second
    assert all(first)


def test_n_choices_stream(client: OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt="1, 2, 3, 4, 5,",
        max_tokens=6,
        n=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    finished = [None, None]
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finished[c.index] = c.finish_reason or finished[c.index]
    assert texts == [" 6, 7,"] * 2 and finished == ["length", "length"]
    assert usage.completion_tokens == 12


def test_json_schema(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Invent a person with a name and an age."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
        max_tokens=48,
        temperature=0,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask('Reply with a JSON object with one key, "color", and nothing else.'),
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", content  # the grammar closed the object
    assert isinstance(json.loads(content), dict)


def test_tool_call_structured(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask("What is the weather in Paris?"),
        tools=TOOLS,
        tool_choice="required",
        max_tokens=48,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # The call goes back in as history and the model answers from the tool's result.
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            *_ask("What is the weather in Paris?"),
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
        ],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    assert follow.choices[0].message.content


def test_tool_call_streamed(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Weather in Rome?"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48,
        temperature=0,
        stream=True,
    )
    calls = [tc for ch in stream if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert calls and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)


def test_text_streams_early_with_tools_offered(client: OpenAI) -> None:
    # Agents (Codex CLI) always send tools: prose must stream as it comes, not at the end.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Name three colours."),
        tools=TOOLS,
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = [ch.choices[0] for ch in stream if ch.choices]
    texts = [c.delta.content for c in chunks[:-1] if c.delta.content]
    assert len(texts) >= 4, texts  # token by token, not one delta at the end
    assert not any(c.delta.tool_calls for c in chunks)
    assert chunks[-1].finish_reason in ("stop", "length")


def test_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Hi"),
        logprobs=True,
        top_logprobs=3,
        max_tokens=4,
        temperature=0,
    )
    content = r.choices[0].logprobs.content
    assert len(content) >= 1
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[-1].logprob
        assert tok.token == tok.top_logprobs[0].token  # greedy takes the best
    c = client.completions.create(
        model=MODEL, prompt="The sky is", logprobs=2, max_tokens=3, temperature=0
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 2
    assert "".join(lp.tokens) == c.choices[0].text


def test_completions(client: OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    echoed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The capital of France is" + r.choices[0].text
    multi = client.completions.create(
        model=MODEL, prompt=["One", "Two"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]


def test_seed_reproduces(client: OpenAI) -> None:
    def once(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt="A story:", max_tokens=12, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    once(1234)  # warm the prefix cache, as in test_n_choices
    runs = [once(1234), once(1234), once(99), once(1234)]
    assert runs[0] == runs[1] == runs[3]


def test_embeddings(client: OpenAI) -> None:
    r = client.embeddings.create(model=MODEL, input=["the cat sat", "a dog ran", "the cat sat"])
    vecs = [d.embedding for d in r.data]
    assert len(vecs) == 3 and len(vecs[0]) == 576
    assert vecs[0] == pytest.approx(vecs[2], abs=1e-5)
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, abs=1e-3)
    assert r.usage.prompt_tokens > 0
    floats = client.embeddings.create(model=MODEL, input="the cat sat", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vecs[0], abs=1e-5)


def test_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(NotFoundError):
        client.models.retrieve("nope")


def test_unknown_and_unsupported_parameters_are_400(client: OpenAI, server: Running) -> None:
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=_ask("x"), extra_body={"frobnicate": True}
        )
    assert e.value.body["param"] == "frobnicate"
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_ask("x"), audio={"voice": "x"})
    assert e.value.body["param"] == "audio" and "not supported" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    assert e.value.body["param"] == "suffix"
    with pytest.raises(BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x", dimensions=3)
    assert e.value.body["param"] == "dimensions"
    r = httpx.post(server.v1 + "/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_errors_are_openai_shaped(server: Running) -> None:
    r = httpx.post(
        server.v1 + "/chat/completions",
        json={"model": "nope", "messages": _ask("x")},
        headers={"x-request-id": "my-trace-1"},
        timeout=10,
    )
    assert r.status_code == 404
    assert r.headers["x-request-id"] == "my-trace-1"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    big = httpx.post(
        server.v1 + "/completions",
        content=b'{"model": "smollm2", "prompt": "' + b"a" * (9 << 20) + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert big.headers["x-request-id"]
    assert httpx.get(server.base + "/no/such/route", timeout=10).status_code == 404


def test_chunked_body_over_the_limit_is_413(server: Running) -> None:
    # No Content-Length: the limit trips while the app reads the body, not in advance.
    def body() -> Iterator[bytes]:
        yield b'{"model": "smollm2", "prompt": "'
        for _ in range(9):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(
        server.v1 + "/completions",
        content=body(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_ops_endpoints(server: Running, client: OpenAI) -> None:
    assert httpx.get(server.base + "/health", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(server.base + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["models"] == {MODEL: "loaded"}
    client.chat.completions.create(model=MODEL, messages=_ask("Hi"), max_tokens=4)
    client.chat.completions.create(model=MODEL, messages=_ask("Hi"), max_tokens=4)
    m = httpx.get(server.base + "/metrics", timeout=10)
    assert m.headers["x-request-id"]
    text = m.text
    for name in (
        'freehold_requests_running{model="smollm2"}',
        'freehold_requests_waiting{model="smollm2"}',
        "freehold_time_to_first_token_seconds_bucket",
        "freehold_time_per_output_token_seconds_bucket",
        'freehold_prompt_tokens_total{model="smollm2"}',
        'freehold_generation_tokens_total{model="smollm2"}',
        'freehold_prefix_cache_hit_tokens_total{model="smollm2"}',
        'freehold_model_load_seconds{model="smollm2"}',
        'freehold_engine_compute_seconds_total{model="smollm2"}',
    ):
        assert name in text, name
    compute = next(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("freehold_engine_compute_seconds_total{")
    )
    assert compute > 0.0  # the two requests above ran through llama_decode


def test_curl_sse_framing(server: Running) -> None:
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = subprocess.run(
        [
            "curl",
            "-sN",
            "--max-time",
            "60",
            server.v1 + "/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    assert out.endswith("data: [DONE]\n\n")
    events = out.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    headers = subprocess.run(
        [
            "curl",
            "-sN",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "60",
            server.v1 + "/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout.lower()
    assert "content-type: text/event-stream" in headers and "x-request-id:" in headers


# Words that each start with their own token, so two prompts share only the chat template's
# prefix. The prefix cache then splits every prompt at the same place, alone or together:
# llama.cpp's numerics depend on how a prompt is split into batches (not on what else is in a
# batch), and this test is about the latter.
WORDS = (
    "Apple Bridge Cloud Dragon Engine Forest Guitar Harbor Island Jungle Kettle Lantern Mountain "
    "Needle Ocean Pencil Queen River Saddle Tiger Umbrella Violin Window Yacht Zebra Anchor "
    "Button Candle Desert Feather Garden Hammer"
).split()


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_32_concurrent_streams_match_greedy_alone(server: Running, client: OpenAI) -> None:
    prompts = [f"{w}: write one sentence about it." for w in WORDS]
    fillers = [f"{w}?" for w in "Quartz Saturn Walnut Orbit Pepper Rocket Velvet Marble".split()]
    engine = server.services.registry.engine(MODEL)
    rendered = [engine.tokenize(engine.render_chat(_ask(p))) for p in prompts + fillers]
    shared = min(_common(a, b) for i, a in enumerate(rendered) for b in rendered[i + 1 :])
    assert all(_common(a, b) == shared for i, a in enumerate(rendered) for b in rendered[i + 1 :])

    def flush_slots() -> None:  # each of the 8 slots ends up holding an unrelated filler
        for f in fillers:
            client.chat.completions.create(model=MODEL, messages=_ask(f), max_tokens=1)

    flush_slots()
    alone = [
        client.chat.completions.create(model=MODEL, messages=_ask(p), max_tokens=16, temperature=0)
        .choices[0]
        .message.content
        for p in prompts
    ]
    flush_slots()

    async def one(ac: AsyncOpenAI, p: str) -> str:
        stream = await ac.chat.completions.create(
            model=MODEL, messages=_ask(p), max_tokens=16, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_at_once() -> list[str]:
        ac = AsyncOpenAI(base_url=server.v1, api_key="unused", timeout=120, max_retries=0)
        async with ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac, p) for p in prompts)), 180)

    together = asyncio.run(all_at_once())
    assert together == alone
    assert len(set(alone)) == 32  # genuinely different outputs, not one echoed everywhere
