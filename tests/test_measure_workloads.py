"""Multi-turn and agent workloads: the script, the conversations sent, and the cached share.

Pure tests build scripts and conversations; fake-server tests (the in-process streaming server
of test_measure_loadgen, whose every reply is unique) check what each turn re-sends; the last
test runs the real CLI against a real Freehold server on SmolLM2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_harness import running_server
from test_measure_loadgen import FakeServer, png_images

from freehold.errors import InvalidInput
from freehold.measure import loadgen, workloads
from freehold.measure.loadgen import Target
from freehold.measure.serving_stats import RequestRecord, summarize
from freehold.measure.workloads import Conversation, Sizing, WorkloadSpec

FAST_TTFT = 0.1


def corpus_words(text: str) -> list[str]:
    """The corpus words in a piece of text (JSON punctuation, types and suffixes aside)."""
    vocab = set(loadgen.vocabulary())
    words = []
    for line in text.splitlines()[1:]:
        fn = json.loads(line)["function"]
        words += fn["name"].split("_") + fn["description"].split()
        for key, param in fn["parameters"]["properties"].items():
            words += [key.split("_")[0], *param["description"].split()]
    assert all(w in vocab for w in words)
    return words


# ---- pure -----------------------------------------------------------------------------------


def test_conversation_resends_everything_with_the_replies() -> None:
    conv = Conversation("be brief")
    first = conv.ask("hello")
    assert first == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    conv.answer(" hi there")
    second = conv.ask("again")
    assert second == [*first, {"role": "assistant", "content": " hi there"}, second[-1]]
    assert second[-1] == {"role": "user", "content": "again"}
    second[0]["content"] = "changed by a caller"  # what was sent is a copy
    assert conv.history[0]["content"] == "be brief"
    assert Conversation("").ask("x") == [{"role": "user", "content": "x"}]  # no prefix


def test_specs_take_each_workloads_defaults_and_refuse_bad_sizes() -> None:
    chat = WorkloadSpec.of("multi-turn")
    assert (chat.users, chat.turns, chat.prefix_len, chat.input_len, chat.output_len) == (
        8,
        4,
        300,
        32,
        64,
    )
    agent = WorkloadSpec.of("agent", turns=3, output_len=None)
    assert (agent.users, agent.turns, agent.prefix_len, agent.output_len) == (4, 3, 4000, 32)
    assert WorkloadSpec.of("multi-turn", prefix_len=0).prefix_len == 0
    with pytest.raises(InvalidInput, match="--workload must be one of random, multi-turn"):
        WorkloadSpec.of("chatty")
    with pytest.raises(InvalidInput, match="--users must be a whole number, at least 1"):
        WorkloadSpec.of("agent", users=0)
    with pytest.raises(InvalidInput, match="--prefix-len"):
        WorkloadSpec.of("agent", prefix_len=-1)


def test_the_same_seed_gives_the_same_script_and_sizes_hold() -> None:
    spec = WorkloadSpec.of("multi-turn", users=3, turns=4)
    sizing = Sizing(prefix_words=50, message_words=7)
    script = workloads.build_script(spec, 5, sizing)
    assert script == workloads.build_script(spec, 5, sizing)
    other = workloads.build_script(spec, 6, sizing)
    assert other.system != script.system and other.messages != script.messages
    assert len(script.system.split()) == 50
    assert len(script.messages) == 3 and all(len(m) == 4 for m in script.messages)
    every = [text for user in script.messages for text in user]
    assert all(len(text.split()) == 7 for text in every)
    assert len(set(every)) == len(every)  # every user's every turn is its own text
    # A piece's words do not depend on the other pieces' sizes (calibration differs by server).
    longer = workloads.build_script(spec, 5, Sizing(prefix_words=80, message_words=7))
    assert longer.messages == script.messages


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1))
def test_tool_definitions_are_json_schemas_of_exactly_n_words(n: int, seed: int) -> None:
    text = workloads.tool_definitions(n, seed)
    if n == 0:
        assert text == ""
        return
    lines = text.splitlines()
    for line in lines[1:]:
        tool = json.loads(line)
        assert tool["type"] == "function" and tool["function"]["name"]
        assert tool["function"]["parameters"]["type"] == "object"
    assert len(corpus_words(text)) == n
    assert text == workloads.tool_definitions(n, seed)
    # A longer text starts with the same whole tools: calibration's probes rely on it.
    longer = workloads.tool_definitions(n + 60, seed).splitlines()
    assert lines[:-1] == longer[: len(lines) - 1]


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["multi-turn", "agent"]),
    users=st.integers(1, 5),
    turns=st.integers(1, 6),
    words=st.integers(1, 40),
    prefix=st.integers(0, 200),
    seed=st.integers(0, 10_000),
)
def test_scripts_have_every_users_every_turn(
    kind: str, users: int, turns: int, words: int, prefix: int, seed: int
) -> None:
    spec = WorkloadSpec.of(kind, users=users, turns=turns)
    script = workloads.build_script(spec, seed, Sizing(prefix, words))
    assert [len(m) for m in script.messages] == [turns] * users
    assert all(len(text.split()) == words for m in script.messages for text in m)
    if kind == "agent":
        assert prefix == 0 or len(corpus_words(script.system)) == prefix
    else:
        assert len(script.system.split()) == prefix


def turn_record(i: int, turn: int, prompt: int, cached: int | None, ttft: float) -> RequestRecord:
    return RequestRecord(
        i, 0.1 * i, True, ttft, ttft + 0.3, [0.1] * 3, prompt, 4, cached_tokens=cached, turn=turn
    )


def test_per_turn_summary_and_the_cached_share_from_turn_2() -> None:
    records = [
        turn_record(0, 1, 100, 0, 0.2),
        turn_record(1, 1, 120, 20, 0.4),
        turn_record(2, 2, 200, 150, 0.1),
        turn_record(3, 2, 220, 180, 0.3),
        RequestRecord(4, error="HTTP 500", turn=3),
    ]
    s = summarize(records, 2.0, label="multi-turn", concurrency=2)
    assert s.total_cached_tokens == 350 and s.cached_share == pytest.approx(350 / 640)
    assert s.cached_share_from_turn_2 == pytest.approx(330 / 420)
    one, two, three = s.turns
    assert (one.turn, one.completed, one.failed, one.prompt_tokens_median) == (1, 2, 0, 110.0)
    assert one.cached_share == pytest.approx(20 / 220)
    assert one.ttft_p50_ms == pytest.approx(300.0) and one.ttft_p95_ms == pytest.approx(390.0)
    # Turn 2 ran from 0.2 s to 0.3 + 0.6 s: 8 tokens in 0.7 s.
    assert two.output_throughput == pytest.approx(8 / 0.7)
    assert (three.completed, three.failed, three.cached_share) == (0, 1, None)
    assert math.isnan(three.ttft_p50_ms)
    # A server that never says what it cached: unknown, not zero.
    unknown = [turn_record(0, 1, 100, None, 0.2), turn_record(1, 2, 150, None, 0.2)]
    s = summarize(unknown, 1.0)
    assert s.cached_share is None and s.total_cached_tokens is None
    assert s.cached_share_from_turn_2 is None
    assert summarize([turn_record(0, 1, 10, 5, 0.1)], 1.0).cached_share_from_turn_2 is None
    assert summarize([RequestRecord(0, 0.0, True, 0.1, 0.2)], 1.0).turns == []


def test_prompt_counts_from_openai_usage_or_llama_server_timings() -> None:
    openai = {"prompt_tokens": 90, "prompt_tokens_details": {"cached_tokens": 64}}
    assert loadgen.prompt_counts(openai, {"cache_n": 1, "prompt_n": 2}) == (90, 64)
    assert loadgen.prompt_counts({"prompt_tokens": 90}, {"cache_n": 80, "prompt_n": 10}) == (
        90,
        80,
    )
    assert loadgen.prompt_counts({"completion_tokens": 3}, {"cache_n": 80, "prompt_n": 12}) == (
        92,
        80,
    )
    assert loadgen.prompt_counts({"prompt_tokens": 90}, None) == (90, None)
    assert loadgen.prompt_counts(None, None) == (0, None)
    bad = {"prompt_tokens": "90", "prompt_tokens_details": {"cached_tokens": -1}}
    assert loadgen.prompt_counts(bad, {"cache_n": True}) == (0, None)


# ---- against a fake server ------------------------------------------------------------------


def script_requests(server: FakeServer, script: workloads.Script) -> list[dict]:
    """The requests of the run itself: not the calibration probes or the warm-up."""
    firsts = {m[0] for m in script.messages}
    return [
        r
        for r in server.requests
        if any(m["role"] == "user" and m["content"] in firsts for m in r["body"]["messages"])
    ]


@pytest.mark.parametrize("cache", ["openai", "llama"])
def test_each_turn_resends_the_reply_streamed_before(tmp_path: Path, cache: str) -> None:
    spec = WorkloadSpec.of("multi-turn", users=2, turns=3, prefix_len=20, input_len=6, output_len=3)
    with FakeServer(tmp_path / "requests.jsonl", cache=cache, ttft=FAST_TTFT) as server:
        target = Target(server.url, "m")  # completions: the workload moves it to chat
        level = workloads.run_conversations(target, spec, seed=3)
        script = workloads.build_script(spec, 3, workloads.Sizing(20, 6))  # the fake: 1 word/tok
        sent = script_requests(server, script)
    assert level.summary.completed == 6 and level.summary.failed == 0
    assert all(r["path"] == "/v1/chat/completions" for r in sent)
    assert len(sent) == 6
    for u, messages in enumerate(script.messages):
        chat = [r for r in sent if r["body"]["messages"][1]["content"] == messages[0]]
        assert len(chat) == 3
        for t, request in enumerate(chat):
            body = request["body"]["messages"]
            assert body[0] == {"role": "system", "content": script.system}
            assert body[-1] == {"role": "user", "content": messages[t]}
            assert len(body) == 2 + 2 * t
            if t:  # the previous turn's messages and the reply streamed to it, as they were
                assert body[:-2] == chat[t - 1]["body"]["messages"]
                assert body[-2] == {"role": "assistant", "content": chat[t - 1]["reply"]}
        records = [r for r in level.records if r.user == u]
        assert [r.turn for r in records] == [1, 2, 3]
    # The fake caches every message but the new one (5 template tokens each).
    for rec in level.records:
        history = 25 if rec.turn == 1 else 25 + (rec.turn - 1) * (11 + 8)
        assert rec.cached_tokens == history
        assert rec.prompt_tokens == history + 11
    s = level.summary
    assert s.cached_share_from_turn_2 == pytest.approx((44 + 63) / (55 + 74))
    assert [t.cached_share for t in s.turns] == pytest.approx([25 / 36, 44 / 55, 63 / 74])
    # Both chats start at once; each turn follows the last reply.
    firsts = [r.start for r in level.records if r.turn == 1]
    assert max(firsts) < 0.05


def test_a_failed_turn_ends_its_conversation(tmp_path: Path) -> None:
    spec = WorkloadSpec.of("multi-turn", users=1, turns=3, prefix_len=5, input_len=3, output_len=2)
    script = workloads.build_script(spec, 0, workloads.Sizing(5, 3))
    level = workloads.run_script(Target("http://127.0.0.1:9", "m"), script)
    assert [r.turn for r in level.records] == [1, 2, 3]
    assert level.summary.failed == 3 and "not sent: turn 1" in (level.records[1].error or "")


def test_bench_cli_agent_workload(tmp_path: Path, home: Path, cli) -> None:
    raw, report = tmp_path / "raw.jsonl", tmp_path / "bench.html"
    args = ["bench", "--url", "", "--workload", "agent", "--users", "2", "--turns", "3"]
    args += ["--prefix-len", "80", "--output-len", "2", "--save-raw", str(raw)]
    with FakeServer(tmp_path / "requests.jsonl", cache="openai", ttft=FAST_TTFT) as server:
        args[2] = server.url
        result = cli(*args, "--json", "--report", report)
        assert result.code == 0, result.err
        human = cli(*args, "--seed", "1")
        sent = [r["body"] for r in server.requests]
    out = result.json()
    (level,) = out["levels"]
    assert level["label"] == "agent: 2 users x 3 turns" and level["completed"] == 6
    assert [t["turn"] for t in level["turns"]] == [1, 2, 3]
    assert 0.5 < level["cached_share_from_turn_2"] < 1 and level["cached_share"] > 0
    assert out["recorded_throughput"] is None  # a cached prefix is no prefill rate
    assert "user messages 32 tokens (32 words)" in out["meta"]["prompts"]  # a word a token
    # The definitions travel as text in the system message, never as an OpenAI tools array.
    assert all("tools" not in body for body in sent)
    systems = {b["messages"][0]["content"] for b in sent if b["messages"][0]["role"] == "system"}
    assert any('"type": "function"' in text for text in systems)
    rows = [json.loads(x) for x in raw.read_text().splitlines()]
    assert len(rows) == 6 and {(r["user"], r["turn"]) for r in rows} == {
        (u, t) for u in (0, 1) for t in (1, 2, 3)
    }
    assert all(r["cached_tokens"] > 0 for r in rows)
    assert not any("messages" in r or "prompt" in r or "reply" in r for r in rows)
    images = png_images(report)
    assert len(images) == 4  # throughput, TTFT, percentiles, TTFT by turn
    assert "Cached share from turn 2 on" in report.read_text()
    assert human.code == 0, human.err
    assert "by turn" in human.out and "Cached share from turn 2 on" in human.out


def test_bench_cli_shows_cached_share_or_na(tmp_path: Path, home: Path, cli) -> None:
    args = ["bench", "--url", "", "--concurrency", "1", "--num-prompts", "2", "--output-len", "2"]
    args += ["--input-len", "5", "--endpoint", "chat", "--no-record"]
    for cache, expected in ((None, None), ("llama", 0.0)):
        with FakeServer(tmp_path / f"{cache}.jsonl", cache=cache, ttft=FAST_TTFT) as server:
            args[2] = server.url
            result = cli(*args, "--json")
            human = cli(*args)
        assert result.code == 0, result.err
        (level,) = result.json()["levels"]
        assert level["cached_share"] == expected  # single messages: nothing cached, or unknown
        assert level["turns"] == [] and level["cached_share_from_turn_2"] is None
        assert ("n/a" in human.out) == (cache is None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--endpoint", "completions"], "drop --endpoint completions"),
        (["--concurrency", "2"], "drop --concurrency"),
        (["--num-prompts", "4"], "drop --num-prompts"),
        (["--users", "0"], "--users must be"),
    ],
)
def test_bench_cli_refuses_what_a_workload_cannot_honour(
    tmp_path: Path, home: Path, cli, extra: list[str], message: str
) -> None:
    with FakeServer(tmp_path / "requests.jsonl", ttft=FAST_TTFT) as server:
        result = cli("bench", "--url", server.url, "--workload", "multi-turn", *extra)
    assert result.code == 2 and result.out == ""
    assert result.err.lstrip().startswith("error:") and message in result.err


def test_bench_cli_refuses_workload_flags_without_a_workload(home: Path, cli) -> None:
    for args, message in (
        (["--users", "2", "--prefix-len", "9"], "--users, --prefix-len: only for --workload"),
        (["--workload", "chatty"], "--workload must be one of random, multi-turn, agent"),
    ):
        result = cli("bench", "--url", "http://127.0.0.1:9", *args)
        assert result.code == 2 and result.err.lstrip().startswith("error:"), result.err
        assert message in result.err


# ---- against a real Freehold server ---------------------------------------------------------


def test_real_server_keeps_a_conversations_history_cached(
    smollm2_path: Path, home: Path, tmp_path: Path, cli
) -> None:
    raw = tmp_path / "raw.jsonl"
    with running_server(home, {"smollm2": smollm2_path}, slots=2) as srv:
        result = cli(
            "bench",
            "--url",
            srv.base,
            "--workload",
            "multi-turn",
            "--users",
            "2",
            "--turns",
            "3",
            "--output-len",
            "8",
            "--prefix-len",
            "100",
            "--no-record",
            "--save-raw",
            raw,
            "--json",
        )
    assert result.code == 0, result.err
    (level,) = result.json()["levels"]
    assert level["completed"] == 6 and level["failed"] == 0
    assert level["cached_share_from_turn_2"] > 0.5
    by_turn = {t["turn"]: t for t in level["turns"]}
    # The history grows: each turn's prompt is longer than the last.
    assert by_turn[1]["prompt_tokens_median"] < by_turn[2]["prompt_tokens_median"]
    assert by_turn[2]["prompt_tokens_median"] < by_turn[3]["prompt_tokens_median"]
    rows = [json.loads(x) for x in raw.read_text().splitlines()]
    assert all(r["success"] and r["cached_tokens"] is not None for r in rows)
    later = [r for r in rows if r["turn"] >= 2]
    assert sum(r["cached_tokens"] for r in later) / sum(r["prompt_tokens"] for r in later) == (
        pytest.approx(level["cached_share_from_turn_2"])
    )
