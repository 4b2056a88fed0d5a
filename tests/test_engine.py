"""The engine on the real SmolLM2 model: equality with llama-cpp-python, batching invariance,
seeds, constraints, stops, limits, cancellation, logprobs, prefix cache, chat and embeddings."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from llama_reference import reference_llama

from freehold.engine import (
    ContextOverflow,
    Delta,
    Engine,
    EngineConfig,
    Finished,
    QueueFull,
    SamplingParams,
    parse_tool_calls,
)
from freehold.engine.sampling import Sampler
from freehold.errors import InvalidInput

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite recipe for pancakes:",
    "In 1969, the first",
    "The best way to learn programming is",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
T = 120  # seconds: generous per-request timeout on a loaded 2-core machine
# One thread: ggml's spinning thread barrier degrades badly when the cores are shared with other
# jobs, and the thread count does not change the numbers a model computes.
THREADS = 1


@pytest.fixture(scope="module")
def engine(smollm2_path: Path):
    eng = Engine(
        smollm2_path, EngineConfig(n_slots=8, n_ctx_per_slot=512, n_threads=THREADS), name="smollm2"
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def alone(engine: Engine) -> list[str]:
    """Each prompt's greedy text, decoded with no other request in the batch."""
    return [engine.complete(p, GREEDY, timeout=T).text for p in PROMPTS]


def _llama_greedy(path: Path, prompts: list[str], flash_attn: bool) -> list[str]:
    llm = reference_llama(
        path,
        n_ctx=512,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        flash_attn=flash_attn,
        verbose=False,
    )
    try:
        return [
            llm.create_completion(p, max_tokens=32, temperature=0.0, repeat_penalty=1.0)["choices"][
                0
            ]["text"]
            for p in prompts
        ]
    finally:
        llm.close()


def test_greedy_matches_llama_cpp_python(
    smollm2_path: Path, engine: Engine, alone: list[str]
) -> None:
    # Same attention kernel on both sides (the engine's default is flash attention).
    assert alone == _llama_greedy(smollm2_path, PROMPTS, engine.config.flash_attn)
    assert all(alone)


def test_greedy_matches_llama_cpp_python_without_flash_attention(smollm2_path: Path) -> None:
    cfg = EngineConfig(n_slots=4, n_ctx_per_slot=512, n_threads=THREADS, flash_attn=False)
    with Engine(smollm2_path, cfg) as eng:
        # One at a time: without flash attention llama.cpp's matmul kernels depend on how a
        # batch is split, so only the flash-attention default is batch-invariant.
        ours = [eng.complete(p, GREEDY, timeout=T).text for p in PROMPTS[:4]]
    assert ours == _llama_greedy(smollm2_path, PROMPTS[:4], False)


def test_eight_concurrent_greedy_equal_alone(engine: Engine, alone: list[str]) -> None:
    before, t0 = engine.stats().compute_seconds, time.perf_counter()
    handles = [engine.submit(p, GREEDY) for p in PROMPTS]
    st = engine.stats()
    assert st.running + st.queued == 8
    assert [h.result(T).text for h in handles] == alone
    # Time inside llama_decode is counted, and can never exceed the wall time it ran in.
    assert 0.0 < engine.stats().compute_seconds - before < time.perf_counter() - t0


def test_staggered_joins_equal_alone(engine: Engine, alone: list[str]) -> None:
    # Requests join mid-flight, beside prefill chunks of others: still the same text.
    handles = []
    for p in reversed(PROMPTS):
        handles.append(engine.submit(p, GREEDY))
        time.sleep(0.02)
    assert [h.result(T).text for h in reversed(handles)] == alone


def test_long_prompts_beside_running_streams_equal_alone(smollm2_path: Path) -> None:
    # Prompts past llama.cpp's 64-row attention tile, prefilled while other streams decode.
    # (Kept under 256 tokens with the reply: longer lone streams decode with a thread-split
    # attention kernel, see freehold.engine.scheduler.)
    facts = " ".join(f"Item {i} costs {i * 3} euros." for i in range(18))
    prompts = [f"{who} wrote: {facts} The most expensive item is" for who in ("Ann", "Bob", "Cy")]
    cfg = EngineConfig(n_slots=4, n_ctx_per_slot=512, n_threads=THREADS, prefix_cache=False)
    with Engine(smollm2_path, cfg) as eng:
        assert all(100 < len(eng.tokenize(p)) < 256 - 32 for p in prompts)
        alone = [eng.complete(p, GREEDY, timeout=T).text for p in prompts]
        busy = eng.submit("Tell me a story.", SamplingParams(temperature=0.0, max_tokens=300))
        handles = []
        for p in prompts:
            handles.append(eng.submit(p, GREEDY))
            time.sleep(0.05)
        together = [h.result(T).text for h in handles]
        busy.cancel()
    assert together == alone


def test_fixed_seed_reproduces_while_others_run(engine: Engine) -> None:
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234, max_tokens=32)
    solo = engine.complete("Tell me a story about a cat.", sp, timeout=T).text
    noise = [
        engine.submit(p, SamplingParams(temperature=0.9, seed=i, max_tokens=40))
        for i, p in enumerate(PROMPTS[:5])
    ]
    again = engine.submit("Tell me a story about a cat.", sp)
    assert again.result(T).text == solo
    for h in noise:
        h.result(T)
    others = {
        engine.complete(
            "Tell me a story about a cat.",
            SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=s, max_tokens=32),
            timeout=T,
        ).text
        for s in (1, 2, 3)
    }
    assert len(others | {solo}) > 1, "different seeds should not all give the same sample"


def test_json_schema_output_validates(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer"},
            "likes_tea": {"type": "boolean"},
        },
        "required": ["name", "age", "likes_tea"],
        "additionalProperties": False,
    }
    msgs = [{"role": "user", "content": "Describe a fictional person as JSON."}]
    r = engine.chat(
        msgs, SamplingParams(temperature=0.0, max_tokens=80, json_schema=schema)
    ).result(T)
    assert r.finish_reason == "stop"
    jsonschema.validate(json.loads(r.text), schema)


def test_json_mode_gives_an_object(engine: Engine) -> None:
    msgs = [{"role": "user", "content": "List two fruits in JSON."}]
    r = engine.chat(msgs, SamplingParams(temperature=0.0, max_tokens=80, json_mode=True)).result(T)
    assert isinstance(json.loads(r.text), dict)


def test_gbnf_grammar_constrains(engine: Engine) -> None:
    g = 'root ::= ("yes" | "no") "."'
    r = engine.complete(
        "Is the sky blue? Answer:", SamplingParams(temperature=0.0, grammar=g), timeout=T
    )
    assert r.text in ("yes.", "no.")
    with pytest.raises(InvalidInput):
        engine.submit("x", SamplingParams(grammar="root ::= ("))


def test_stop_string_split_across_tokens_is_never_emitted(engine: Engine) -> None:
    prompt = "Once upon a time, in a small village,"
    full = engine.complete(prompt, GREEDY, timeout=T)
    pieces = [engine.model.piece(t).decode("utf-8", "replace") for t in full.tokens]
    # A stop string straddling a token boundary: the end of one token and the start of the next.
    k = next(
        i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    text_before = full.text[: full.text.index(stop)]
    streamed = []
    h = engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=32, stop=[stop]))
    for ev in h.events(timeout=T):
        if isinstance(ev, Delta):
            streamed.append(ev.text)
            assert stop not in "".join(streamed)
        else:
            assert ev.finish_reason == "stop"
    assert "".join(streamed) == text_before


def test_overlong_prompt_refused_with_both_numbers(engine: Engine) -> None:
    prompt = "hello " * 700
    n = len(engine.tokenize(prompt))
    with pytest.raises(ContextOverflow) as e:
        engine.submit(prompt, GREEDY)
    assert str(n) in str(e.value) and "512" in str(e.value)


def test_generation_stops_at_context_end_with_length(engine: Engine) -> None:
    prompt = "one two three four " * 125
    n = len(engine.tokenize(prompt))
    assert 490 < n < 512
    sp = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    r = engine.complete(prompt, sp, timeout=T)
    assert r.finish_reason == "length"
    assert r.usage.completion_tokens == 512 - n


def test_max_tokens_finishes_with_length(engine: Engine) -> None:
    r = engine.complete("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=5), timeout=T)
    assert r.finish_reason == "length" and r.usage.completion_tokens == 5


def test_cancel_frees_the_slot_within_a_step(smollm2_path: Path) -> None:
    with Engine(
        smollm2_path, EngineConfig(n_slots=1, n_ctx_per_slot=512, n_threads=THREADS)
    ) as eng:
        sp = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        h = eng.submit("Write a very long essay about rivers.", sp)
        waiting = eng.submit("The capital of France is", GREEDY)
        seen = 0
        backlog = None
        for ev in h.events(timeout=T):
            if isinstance(ev, Delta):
                seen += 1
                if seen == 3:
                    h.cancel()
                    cancelled_at = time.perf_counter()
                    backlog = h._sync.qsize()  # events produced but not yet read
            else:
                assert ev.finish_reason == "cancelled"
                assert time.perf_counter() - cancelled_at < 2.0
                # At most the one step already in flight when cancel() was called.
                assert ev.usage.completion_tokens - 3 - backlog <= 1
        # The freed slot serves the queued request.
        assert waiting.result(T).text
        assert eng.stats().running == 0


def test_long_prefill_is_chunked_between_decode_steps(smollm2_path: Path) -> None:
    cfg = EngineConfig(n_slots=2, n_ctx_per_slot=512, n_batch=64, n_threads=THREADS)
    with Engine(smollm2_path, cfg) as eng:
        sp = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        stream = eng.submit("Tell me a story.", sp)
        stamps: list[float] = []
        decoding = threading.Event()

        def consume() -> None:
            for _ev in stream.events(timeout=T):
                stamps.append(time.perf_counter())
                if len(stamps) == 3:
                    decoding.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert decoding.wait(T)
        long_prompt = "alpha beta gamma delta " * 100  # ~400 tokens: 7+ chunks of 64
        t0 = time.perf_counter()
        r = eng.submit(long_prompt, SamplingParams(temperature=0.0, max_tokens=1)).result(T)
        t1 = t0 + r.timings.ttft_s
        stream.cancel()
        reader.join(T)
        during = [s for s in stamps if t0 < s < t1]
        # The stream gets a token with every prefill chunk: it never waits for the whole prompt.
        assert r.usage.prompt_tokens > 6 * 64
        assert len(during) >= 5, len(during)


def test_queue_full_is_raised_at_once(smollm2_path: Path) -> None:
    cfg = EngineConfig(n_slots=1, n_ctx_per_slot=256, max_queue=2, n_threads=THREADS)
    with Engine(smollm2_path, cfg) as eng:
        sp = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        hs = [eng.submit("Tell me about the sea.", sp)]
        deadline = time.monotonic() + 30
        while eng.stats().running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        hs += [eng.submit("a", sp), eng.submit("b", sp)]
        t = time.perf_counter()
        with pytest.raises(QueueFull):
            eng.submit("c", sp)
        assert time.perf_counter() - t < 0.5
        for h in hs:
            h.cancel()
        assert [h.result(T).finish_reason for h in hs] == ["cancelled"] * 3


def test_logprobs(engine: Engine) -> None:
    sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=True, top_logprobs=3)
    r = engine.complete("The capital of France is", sp, timeout=T)
    assert len(r.logprobs) == len(r.tokens) == 8
    for lp in r.logprobs:
        assert lp.logprob <= 0.0
        assert len(lp.top) == 3
        assert lp.top[0].token == lp.token  # greedy picks the most likely token
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert sum(pow(2.718281828, t.logprob) for t in lp.top) <= 1.0 + 1e-6


def test_plain_greedy_argmax_equals_llama_cpps_sampler_chain(engine: Engine) -> None:
    # A plain greedy request takes the argmax straight from the logits row. A zero logit bias
    # changes no logit but sends the same request through llama.cpp's native sampler chain.
    msgs = [{"role": "user", "content": "Say hi."}]
    ends = engine.chat(msgs, SamplingParams(temperature=0.0, max_tokens=48)).result(T)
    assert ends.finish_reason == "stop"  # so the ban below is exercised: the model wants to end
    neutral = {ends.tokens[0]: 0.0}
    banned = {t: -math.inf for t in engine.model.eog_tokens()}
    reasons = []
    for extra in ({}, {"ignore_eos": True}, {"logit_bias": banned}):
        fast = SamplingParams(temperature=0.0, max_tokens=48, **extra)
        bias = {**extra.get("logit_bias", {}), **neutral}
        chain = SamplingParams(temperature=0.0, max_tokens=48, **{**extra, "logit_bias": bias})
        for sp, native in ((fast, False), (chain, True)):
            sampler = Sampler(engine.model, sp, seed=0)
            assert sampler.native is native
            sampler.close()
        a, b = (engine.chat(msgs, sp).result(T) for sp in (fast, chain))
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        reasons.append(a.finish_reason)
    assert reasons == ["stop", "length", "length"]  # both bans ran past where the model ends


def test_prefix_cache_reuses_a_long_system_prompt(engine: Engine) -> None:
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: be kind." for i in range(40))
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi!"}]
    first = engine.chat(msgs, GREEDY).result(T)
    msgs2 = [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]
    second = engine.chat(msgs2, GREEDY).result(T)
    assert first.usage.prompt_tokens > 200
    assert second.usage.cached_tokens > 200
    assert second.usage.cached_tokens < second.usage.prompt_tokens
    # Reusing the cache does not change the answer.
    assert engine.chat(msgs2, GREEDY).result(T).text == second.text


def test_prefix_is_borrowed_from_a_busy_slot(smollm2_path: Path) -> None:
    system = "You answer in French. " + " ".join(f"Fact {i}: water is wet." for i in range(40))
    ask = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    tale = [{"role": "system", "content": system}, {"role": "user", "content": "Tell a long tale."}]
    # q8_0 KV: llama.cpp then uses one attention kernel for every batch shape, so a borrowed
    # prefix must give bit-for-bit the answer of a cold computation.
    cfg = EngineConfig(n_slots=3, n_ctx_per_slot=512, n_threads=THREADS, kv_type="q8_0")
    with Engine(smollm2_path, cfg) as eng:
        eng.complete("Some other prompt entirely.", GREEDY, timeout=T)  # a free slot's cache
        long = eng.chat(tale, SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True))
        try:
            next(ev for ev in long.events(timeout=T) if isinstance(ev, Delta))  # it is decoding
            r = eng.chat(ask, GREEDY).result(T)
        finally:
            long.cancel()
            long.result(T)
    assert r.usage.cached_tokens > 200
    with Engine(smollm2_path, EngineConfig(**{**cfg.__dict__, "n_slots": 1})) as cold:
        expected = cold.chat(ask, GREEDY).result(T)
    assert expected.usage.cached_tokens == 0
    assert r.text == expected.text


def test_gap_between_running_slots_is_closed(smollm2_path: Path) -> None:
    cfg = EngineConfig(
        n_slots=3, n_ctx_per_slot=256, n_threads=THREADS, kv_type="q8_0", prefix_cache=False
    )
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    with Engine(smollm2_path, cfg) as eng:
        expected = eng.complete("Count to twenty:", sp, timeout=T).text
        first, middle, last = (
            eng.submit(p, q) for p, q in (("A", long), ("B", long), ("Count to twenty:", sp))
        )
        deadline = time.monotonic() + T
        while eng.stats().running < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [s.req.handle for s in eng._slots] == [first, middle, last]  # type: ignore[union-attr]
        middle.cancel()
        while eng._slots[2].req is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        # The last request moved into the gap, so the two left decode as one batch...
        moved = eng._slots[1].req
        assert moved is not None and moved.handle is last
        result = last.result(T)
        first.cancel()
    # ...and the move did not change its output.
    assert result.text == expected


def test_simultaneous_requests_share_one_prefill(smollm2_path: Path) -> None:
    system = "You are terse. " + " ".join(f"Policy {i}: refunds take a week." for i in range(40))
    cfg = EngineConfig(n_slots=4, n_ctx_per_slot=512, n_batch=128, n_threads=THREADS)
    with Engine(smollm2_path, cfg) as eng:
        handles = [
            eng.chat(
                [{"role": "system", "content": system}, {"role": "user", "content": q}],
                SamplingParams(temperature=0.0, max_tokens=4),
            )
            for q in ("Hi", "Refund?", "When?", "Thanks")
        ]
        results = [h.result(T) for h in handles]
    n_prompt = results[0].usage.prompt_tokens
    assert n_prompt > 300 and results[0].usage.cached_tokens == 0
    # The other three copy (most of) the system prompt's KV from the first instead of computing
    # it: they wait while it is computed, unless less than a copy's worth remains.
    assert all(r.usage.cached_tokens >= 0.75 * n_prompt for r in results[1:]), [
        r.usage.cached_tokens for r in results
    ]


def test_prompts_arriving_together_prefill_in_one_step(smollm2_path: Path) -> None:
    cfg = EngineConfig(n_slots=8, n_ctx_per_slot=256, n_threads=THREADS, prefix_cache=False)
    with Engine(smollm2_path, cfg) as eng:
        tokens = [eng.tokenize(p) for p in PROMPTS]
        n = min(len(t) for t in tokens)
        sp = SamplingParams(temperature=0.0, max_tokens=2)
        handles = [eng.submit(t[:n], sp) for t in tokens]  # equal lengths: one call for all
        results = [h.result(T) for h in handles]
    # Requests prefilled by the same llama_decode call get their first token at the same
    # instant. The scheduler may wake before the last submits land, so allow a few calls; a
    # one-prompt-per-step scheduler gives eight different instants.
    pairs = zip(handles, results, strict=True)
    firsts = {round(h.submitted_at + r.timings.ttft_s, 6) for h, r in pairs}
    assert len(firsts) <= 4, firsts


def test_chat_uses_the_models_template(engine: Engine) -> None:
    prompt = engine.render_chat([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    r = engine.chat([{"role": "user", "content": "What is 2+2?"}], GREEDY).result(T)
    assert r.finish_reason == "stop" and "4" in r.text


def test_tool_calls_round_trip(engine: Engine) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    prompt = engine.render_chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools)
    assert "get_weather" in prompt and "<tool_call>" in prompt
    # Constrain the reply to the call format so the tiny model's answer is parseable.
    g = (
        'root ::= "<tool_call>{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"" '
        '[A-Za-z ]{1,20} "\\"}}</tool_call>"'
    )
    r = engine.chat(
        [{"role": "user", "content": "Weather in Paris?"}],
        SamplingParams(temperature=0.0, max_tokens=48, grammar=g),
        tools=tools,
    ).result(T)
    content, calls = parse_tool_calls(r.text)
    assert content == "" and len(calls) == 1
    assert calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)


def test_async_iteration(engine: Engine, alone: list[str]) -> None:
    async def go() -> str:
        h = engine.submit(PROMPTS[0], GREEDY)
        parts = []
        async for ev in h:
            if isinstance(ev, Delta):
                parts.append(ev.text)
            else:
                assert isinstance(ev, Finished)
        return "".join(parts)

    assert asyncio.run(asyncio.wait_for(go(), T)) == alone[0]


def test_threads_submit_concurrently(engine: Engine, alone: list[str]) -> None:
    out: dict[int, str] = {}

    def worker(i: int) -> None:
        out[i] = engine.complete(PROMPTS[i], GREEDY, timeout=T).text

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(T)
    assert [out[i] for i in range(4)] == alone[:4]


def test_embeddings(engine: Engine) -> None:
    a, b, a2 = engine.embed(
        ["The cat sat on the mat.", "Quantum chromodynamics", "The cat sat on the mat."]
    )
    assert len(a) == engine.model.n_embd
    assert a == pytest.approx(a2, abs=1e-6)
    assert sum(x * x for x in a) == pytest.approx(1.0, rel=1e-4)
    assert a != pytest.approx(b)


def test_bad_params_are_invalid_input(engine: Engine) -> None:
    for bad in (
        SamplingParams(temperature=-1),
        SamplingParams(top_p=0),
        SamplingParams(max_tokens=0),
        SamplingParams(json_mode=True, grammar='root ::= "a"'),
    ):
        with pytest.raises(InvalidInput):
            engine.submit("hi", bad)
    with pytest.raises(InvalidInput):
        engine.submit("", GREEDY)
