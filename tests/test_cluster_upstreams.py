"""`freehold serve --upstream`: models served by other OpenAI-compatible servers behind the
gateway, with its keys, quotas, ledger and metrics.

Two real Freehold servers on SmolLM2 are the upstreams; each also reports vLLM's
`vllm:num_requests_waiting` gauge, which the test sets (this machine cannot run vLLM, so only
that gauge is faked). A third server, with no local model, is the gateway, driven with the
official `openai` SDK.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from server_harness import Running, running_server

from freehold import doctor
from freehold.cluster.upstream import StreamReader, chat_body, forced_choice, sampling_fields
from freehold.config import paths
from freehold.engine import Delta, SamplingParams
from freehold.measure import hardware, savings, upstream_prices
from freehold.server.auth import KeyStore
from freehold.server.errors import APIError
from freehold.server.settings import parse_upstreams

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Say hello."}]


class VllmWaiting(Collector):
    """vLLM's queue gauge, at a value the test sets."""

    def __init__(self) -> None:
        self.waiting = 0.0

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting", labels=["model_name"]
        )
        g.add_metric([MODEL], self.waiting)
        yield g


@dataclass
class Upstream:
    server: Running
    gauge: VllmWaiting
    stack: ExitStack

    def chats(self) -> float:
        """Chat completions this upstream has answered."""
        labels = {"model": MODEL, "endpoint": "chat", "status": "200"}
        reg = self.server.services.metrics.registry
        return reg.get_sample_value("freehold_requests_total", labels) or 0.0

    def stop(self) -> None:
        self.stack.close()


@dataclass
class Cluster:
    a: Upstream
    b: Upstream
    gateway: Running
    secrets: dict[str, str]

    def client(self, key: str = "all") -> OpenAI:
        return OpenAI(
            base_url=self.gateway.v1, api_key=self.secrets[key], timeout=120, max_retries=0
        )

    def get(self, path: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.secrets['all']}"}
        return httpx.get(self.gateway.base + path, headers=auth, timeout=10)

    def gauge(self, name: str, upstream: str) -> float | None:
        for fam in text_string_to_metric_families(self.get("/metrics").text):
            for s in fam.samples:
                if s.name == name and s.labels.get("upstream") == upstream:
                    return s.value
        return None

    def wait_for(self, name: str, upstream: str, value: float, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.gauge(name, upstream) != value:
            assert time.monotonic() < deadline, f"{name}{{upstream={upstream}}} never {value}"
            time.sleep(0.1)


def _upstream(home: Path, smollm2_path: Path) -> Upstream:
    stack = ExitStack()
    server = stack.enter_context(
        running_server(home, {MODEL: smollm2_path}, threads=1, slots=2, ctx=512)
    )
    gauge = VllmWaiting()
    server.services.metrics.registry.register(gauge)
    return Upstream(server, gauge, stack)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Cluster]:
    a = _upstream(tmp_path_factory.mktemp("up-a"), smollm2_path)
    b = _upstream(tmp_path_factory.mktemp("up-b"), smollm2_path)
    home = tmp_path_factory.mktemp("gateway")
    with KeyStore(paths(home).keys) as store:
        secrets = {"all": store.create("all")[1], "slow": store.create("slow", rpm=3)[1]}
    specs = parse_upstreams([f"a={a.server.v1},model={MODEL}", f"b={b.server.base},model={MODEL}"])
    auth = {"Authorization": f"Bearer {secrets['all']}"}
    try:
        with running_server(home, {}, ready_headers=auth, upstreams=specs) as gateway:
            yield Cluster(a, b, gateway, secrets)
    finally:
        a.stop()
        b.stop()


def _set_waiting(cluster: Cluster, a: float, b: float) -> None:
    cluster.a.gauge.waiting, cluster.b.gauge.waiting = a, b
    cluster.wait_for("freehold_upstream_waiting", "a", a)
    cluster.wait_for("freehold_upstream_waiting", "b", b)


def _chat(client: OpenAI, **kw: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0, **kw
    )


def _ledger_tokens(home: Path, where: str = "status = 200") -> tuple[int, int]:
    db = sqlite3.connect(paths(home).ledger)
    try:
        row = db.execute(
            f"SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM requests WHERE {where}"
        ).fetchone()
    finally:
        db.close()
    return row[0] or 0, row[1] or 0


# -- through the gateway -----------------------------------------------------------------------


def test_chat_goes_to_the_less_loaded_upstream(cluster: Cluster) -> None:
    client = cluster.client()
    _set_waiting(cluster, a=5, b=0)
    before_a, before_b = cluster.a.chats(), cluster.b.chats()
    reply = _chat(client)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: the same text either way
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert (cluster.a.chats(), cluster.b.chats()) == (before_a, before_b + 2)

    _set_waiting(cluster, a=0, b=5)  # now a is the less loaded
    _chat(client)
    assert (cluster.a.chats(), cluster.b.chats()) == (before_a + 1, before_b + 2)


def test_rpm_quota_and_ledger_hold_for_upstream_models(cluster: Cluster) -> None:
    client = cluster.client("slow")
    replies = [_chat(client) for _ in range(3)]
    with pytest.raises(openai.RateLimitError):
        _chat(client)
    assert cluster.gateway.services.ledger.flush()
    # The key is billed what the upstreams reported, request by request.
    prompt = sum(r.usage.prompt_tokens for r in replies if r.usage)
    completion = sum(r.usage.completion_tokens for r in replies if r.usage)
    home = cluster.gateway.home
    assert _ledger_tokens(home, "key_name = 'slow' AND status = 200") == (prompt, completion)
    assert _ledger_tokens(home, "key_name = 'slow' AND status = 429") == (0, 0)
    assert cluster.gateway.services.audit.flush()
    audit = [json.loads(x) for x in paths(home).audit_log.read_text().splitlines()]
    mine = [e["status"] for e in audit if e.get("key") == "slow" and e.get("model") == MODEL]
    assert mine == [200, 200, 200, 429]
    # Every token the gateway billed was generated upstream, and nothing else was.
    for up in (cluster.a, cluster.b):
        assert up.server.services.ledger.flush()
    upstream_total = [
        sum(x)
        for x in zip(*(_ledger_tokens(u.server.home) for u in (cluster.a, cluster.b)), strict=True)
    ]
    assert list(_ledger_tokens(home)) == upstream_total


def test_savings_price_upstream_tokens_at_the_upstreams_own_row(
    cluster: Cluster, tmp_path: Path
) -> None:
    home = paths(cluster.gateway.home)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(
        "provider,model,open_weights(yes/no),input_usd_per_mtok,output_usd_per_mtok,as_of,"
        "source_url\nDear,big,no,2,10,2026-01-02,https://example.com/dear\n"
        "Cheap,small,yes,0.5,5,2026-03-04,https://example.com/cheap\n"
    )
    hardware.set_profile(["rent_usd_per_hour=3.6", "utilisation=100%", "ops_usd_per_hour=0"], home)
    # What `freehold serve --upstream …,price=cheap/small` records; not on the bundled sheet.
    assert upstream_prices.record(home, [(MODEL, "cheap/small")]) == ["cheap/small"]
    assert cluster.gateway.services.ledger.flush()
    prompt, completion = _ledger_tokens(cluster.gateway.home, "1")
    assert prompt and completion
    rep = savings.build_savings(by="model", price_file=sheet, home=home, only=["Dear"])
    (rate,) = rep.rates
    assert (rate.model, rate.priced_as) == (MODEL, "Cheap small")
    assert rep.total.here_usd == pytest.approx((prompt * 0.5 + completion * 5) / 1e6)
    (dear,) = rep.total.apis
    assert dear.usd == pytest.approx((prompt * 2 + completion * 10) / 1e6)
    assert rep.total.unmeasured_models == []


def test_tool_calls_come_back_as_tool_calls(cluster: Cluster) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = cluster.client().chat.completions.create(
        model=MODEL, messages=ask, tools=[tool], tool_choice="required", max_tokens=60
    )
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert reply.choices[0].finish_reason == "tool_calls"


def test_upstream_refusals_keep_their_status(cluster: Cluster) -> None:
    # The upstreams hold 512 tokens per request; the gateway cannot know that, they refuse.
    long = [{"role": "user", "content": "hello " * 700}]
    with pytest.raises(openai.BadRequestError) as e:
        cluster.client().chat.completions.create(model=MODEL, messages=long, max_tokens=8)
    assert "upstream" in e.value.message
    # Token-level routes need a tokenizer the gateway does not have: refused, not crashed.
    with pytest.raises(openai.APIStatusError) as e2:
        cluster.client().embeddings.create(model=MODEL, input="hello")
    assert e2.value.status_code == 501


def test_other_doors_serve_upstream_models(cluster: Cluster) -> None:
    claude = anthropic.Anthropic(
        base_url=cluster.gateway.base, api_key=cluster.secrets["all"], max_retries=0
    )
    msg = claude.messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert msg.content[0].text and msg.usage.input_tokens > 0  # type: ignore[union-attr]
    with pytest.raises(anthropic.APIStatusError) as e:
        claude.messages.count_tokens(model=MODEL, messages=HELLO)
    assert e.value.status_code == 501
    auth = {"Authorization": f"Bearer {cluster.secrets['all']}"}
    r = httpx.post(
        cluster.gateway.base + "/api/chat",
        json={"model": MODEL, "messages": HELLO, "stream": False, "options": {"num_predict": 8}},
        headers=auth,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["message"]["content"], r.text
    gen = httpx.post(
        cluster.gateway.base + "/api/generate",
        json={"model": MODEL, "prompt": "Hi", "stream": False},
        headers=auth,
        timeout=60,
    )
    assert gen.status_code == 501 and "tokenizer" in gen.json()["error"]
    # Ollama's model listings describe weights files; an upstream's are elsewhere.
    tags = httpx.get(cluster.gateway.base + "/api/tags", headers=auth, timeout=10)
    assert tags.status_code == 200 and tags.json()["models"] == []
    show = httpx.post(
        cluster.gateway.base + "/api/show", json={"model": MODEL}, headers=auth, timeout=10
    )
    assert show.status_code == 501 and "upstream" in show.json()["error"]


def test_client_leaving_closes_the_upstream_stream(cluster: Cluster) -> None:
    _set_waiting(cluster, a=5, b=0)
    b_ledger = cluster.b.server.home
    stream = cluster.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 500, one number per line."}],
        max_tokens=400,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    # The upstream sees its client (the gateway) leave, and stops generating.
    deadline = time.monotonic() + 15
    while True:
        assert cluster.b.server.services.ledger.flush()
        left = _ledger_tokens(b_ledger, "status = 499")
        if left != (0, 0):
            break
        assert time.monotonic() < deadline, "the upstream never saw the client leave"
        time.sleep(0.1)
    assert 0 < left[1] < 400
    cluster.wait_for("freehold_upstream_in_flight", "b", 0)


def test_dead_upstream_is_cooled_down_and_traffic_moves(cluster: Cluster) -> None:
    client = cluster.client()
    _set_waiting(cluster, a=5, b=0)  # b would get everything
    cluster.b.stop()
    served_by_a = cluster.a.chats()
    for _ in range(3):
        assert _chat(client).choices[0].message.content
    assert cluster.a.chats() == served_by_a + 3
    assert cluster.gauge("freehold_upstream_healthy", "b") == 0
    assert cluster.gauge("freehold_upstream_healthy", "a") == 1
    ready = cluster.get("/ready")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["models"][MODEL] == "loaded"
    assert body["upstreams"]["b"]["state"] == "cooling down"
    assert body["upstreams"]["a"]["state"] == "healthy"
    lines = dict(doctor.report_lines(_with_server(cluster)))
    assert lines["  upstream b"].startswith("cooling down")
    assert lines[f"  {MODEL}"] == "loaded; served by upstream a, b"


def _with_server(cluster: Cluster) -> doctor.DoctorReport:
    """`freehold doctor --url` against the gateway."""
    report = doctor.local_report()
    found = doctor.server_devices(cluster.gateway.base, cluster.secrets["all"])
    return replace(report, server_url=cluster.gateway.base, server=found)


def test_serve_refuses_a_bad_upstream(cli) -> None:
    r = cli("serve", "--upstream", "a=localhost:8000")
    assert r.code == 2
    assert "e.g. --upstream" in r.err


# -- request and stream translation ------------------------------------------------------------


def test_sampling_params_become_openai_fields() -> None:
    params = SamplingParams(max_tokens=5, temperature=0, seed=7, stop=["\n"], json_mode=True)
    body = chat_body("m", HELLO, params, None)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["seed"] == 7 and body["stop"] == ["\n"]
    assert body["response_format"] == {"type": "json_object"}
    assert "top_k" not in body and "min_p" not in body  # hosted APIs refuse unknown fields
    with pytest.raises(APIError) as e:
        sampling_fields(SamplingParams(grammar='root ::= "a"'))
    assert e.value.status == 400


def test_a_forced_tool_call_is_asked_for_as_tool_choice() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    one = {"type": "object", "properties": {"name": {"const": "f"}}}
    body = chat_body("m", HELLO, SamplingParams(json_schema=one), [tool])
    assert "response_format" not in body
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert forced_choice({"anyOf": [one, one]}) == "required"


def test_stream_reader_turns_chunks_into_events() -> None:
    r = StreamReader(time.perf_counter())
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Hi"}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "function": {"name": "get", "arguments": '{"q":'}}
                        ]
                    }
                }
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    ]
    events = [ev for c in chunks for ev in r.feed(c)]
    assert events == [Delta("Hi", (-1,))]
    assert r.calls_text() == '<tool_call>{"name": "get", "arguments": {"q": 1}}</tool_call>'
    end = r.finished()
    assert end.finish_reason == "stop" and end.usage.prompt_tokens == 9
    assert end.usage.completion_tokens == 4
    broken = StreamReader(time.perf_counter())
    list(broken.feed({"error": {"message": "out of memory"}}))
    assert broken.finished().finish_reason == "error"
