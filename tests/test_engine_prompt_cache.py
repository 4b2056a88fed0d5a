"""Conversations keep their KV: slot affinity, the host-memory prompt cache, and its limits.

The exact figure checked is the ideal one: on every later turn, a conversation's cached tokens
equal the prefix its previous turn left in the KV (that prompt plus the reply, less the last
token, which is never decoded). Anything recomputed beyond that is history that was lost.
"""

from __future__ import annotations

import ctypes
import random
import threading
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_file import write_lora

from freehold.engine import Engine, EngineConfig, PromptCache, SamplingParams
from freehold.engine.prompt_cache import common_prefix

T = 300
WORDS = files("freehold.measure").joinpath("data", "corpus.txt").read_text().split()


def _text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _ideal(prev: list[int], prompt: list[int]) -> int:
    """The cached tokens a turn can have: what it shares with its previous turn's KV."""
    shared = common_prefix(np.asarray(prev, np.int32), np.asarray(prompt, np.int32))
    return min(shared, len(prompt) - 1)


# ---- many conversations at once --------------------------------------------------------------


def test_eight_concurrent_conversations_keep_their_history(smollm2_path: Path) -> None:
    """8 users × 4 turns on 8 slots: from turn 2 on, nothing of any history is recomputed."""
    system = _text(0, 450)  # ~560 tokens: agents and chat UIs send long system prompts
    rows: dict[tuple[int, int], tuple[int, int, int | None]] = {}
    errors: list[BaseException] = []
    cache = PromptCache(1 << 30)
    config = EngineConfig(n_slots=8, n_ctx_per_slot=1536)
    with Engine(smollm2_path, config, prompt_cache=cache) as engine:

        def user(u: int) -> None:
            try:
                messages = [{"role": "system", "content": system}]
                prev: list[int] | None = None
                for turn in range(4):
                    messages.append({"role": "user", "content": _text(100 + 10 * u + turn, 12)})
                    prompt = engine.chat_tokens(messages)
                    done = engine.complete(prompt, _greedy(16), timeout=T)
                    ideal = None if prev is None else _ideal(prev, prompt)
                    rows[(u, turn)] = (len(prompt), done.usage.cached_tokens, ideal)
                    prev = prompt + list(done.tokens[:-1])
                    messages.append({"role": "assistant", "content": done.text})
            except BaseException as e:  # re-raised in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=user, args=(u,)) for u in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
    assert not errors, errors
    later = [rows[(u, turn)] for u in range(8) for turn in range(1, 4)]
    lost = [(n, cached, ideal) for n, cached, ideal in later if cached != ideal]
    assert not lost, f"turns that recomputed history (prompt, cached, ideal): {lost}"
    share = sum(c for _, c, _ in later) / sum(n for n, _, _ in later)
    assert share >= 0.95, f"cached share from turn 2 on is {share:.3f}"
    assert stats.prompt_tokens_cached + stats.prompt_tokens_computed == sum(
        n for n, _, _ in rows.values()
    )


# ---- evicted to host memory and back -------------------------------------------------------


def _evict_and_return(
    engine: Engine, first: str, other: str, follow_up: str
) -> tuple[list[int], list[int], int]:
    """Run `first`, let `other` take the only slot, then return with first + reply + follow_up.

    Returns the return prompt, its greedy tokens, and its cached count.
    """
    a = engine.complete(first, _greedy(12), timeout=T)
    engine.complete(other, _greedy(4), timeout=T)
    prompt = engine.tokenize(first) + list(a.tokens) + engine.tokenize(follow_up, add_special=False)
    back = engine.complete(prompt, _greedy(12), timeout=T)
    return prompt, list(back.tokens), back.usage.cached_tokens


@pytest.fixture(params=["smollm2", "gemma"])
def model_path(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_path")


def test_a_short_turn_after_a_long_prefix_is_computed_as_one_attention_tile(
    smollm2_path: Path,
) -> None:
    """After ~1,500 cached tokens, 40 new ones run as a 64-row chunk (the CPU's tiled attention
    kernel; row by row is several times slower there); 8 new ones stay row by row."""
    cfg = EngineConfig(n_slots=1, n_ctx_per_slot=2048, n_threads=2)
    with Engine(smollm2_path, cfg) as engine:
        history = engine.tokenize(_text(7, 1200))[:1500]
        assert engine.complete(history, _greedy(1), timeout=T).usage.cached_tokens == 0
        more = engine.tokenize(_text(8, 60), add_special=False)
        long_turn = history + more[:40]
        assert engine.complete(long_turn, _greedy(1), timeout=T).usage.cached_tokens == (
            len(long_turn) - 64
        )
        short_turn = long_turn + more[40:48]
        done = engine.complete(short_turn, _greedy(1), timeout=T)
        assert done.usage.cached_tokens == len(long_turn)


def test_evicted_conversation_is_restored_not_recomputed(model_path: Path) -> None:
    first, other = _text(1, 200), _text(2, 150)
    follow_up = " And then " + _text(3, 20)
    config = EngineConfig(n_slots=1, n_ctx_per_slot=1024)
    cache = PromptCache(1 << 30)
    with Engine(model_path, config, prompt_cache=cache) as engine:
        prompt, tokens, cached = _evict_and_return(engine, first, other, follow_up)
        first_len = len(engine.tokenize(first))
        stats = engine.stats()
    assert stats.prompt_cache_hits == 1
    assert cache.stats().entries >= 1
    # The whole history came back: the first prompt and its reply but the undecoded last token.
    assert cached == first_len + 12 - 1

    # Without the cache the history is recomputed, and gives the very same tokens.
    with Engine(model_path, config) as engine:
        _, again, cached_cold = _evict_and_return(engine, first, other, follow_up)
        cold = engine.complete(prompt, _greedy(12), timeout=T)
    assert cached_cold < first_len  # only what `other` shares with it (the BOS, if any)
    assert tokens == again
    assert tokens == list(cold.tokens)


def test_cache_keeps_to_its_byte_budget(smollm2_path: Path) -> None:
    config = EngineConfig(n_slots=1, n_ctx_per_slot=512)
    probe_cache = PromptCache(1 << 30)
    with Engine(smollm2_path, config, prompt_cache=probe_cache) as probe:
        probe.complete(_text(10, 200), _greedy(4), timeout=T)
        probe.complete(_text(11, 200), _greedy(4), timeout=T)
    budget = int(probe_cache.stats().bytes * 1.5)  # room for one saved conversation, not two
    cache = PromptCache(budget)
    with Engine(smollm2_path, config, prompt_cache=cache) as engine:
        for i in range(5):
            engine.complete(_text(20 + i, 200), _greedy(4), timeout=T)
            assert cache.stats().bytes <= budget
    stats = cache.stats()
    assert stats.entries == 1 and stats.saved == 4 and stats.evictions == 3


# ---- never the wrong weights -----------------------------------------------------------------


def test_state_of_another_model_or_adapter_is_never_restored(
    smollm2_path: Path, gemma_path: Path, tmp_path: Path
) -> None:
    first, other = _text(4, 200), _text(5, 150)
    follow_up = " Next " + _text(6, 10)
    cache = PromptCache(1 << 30)
    config = EngineConfig(n_slots=1, n_ctx_per_slot=1024)
    adapter = write_lora(tmp_path / "lora.gguf", scale=1.0)
    with Engine(smollm2_path, config, prompt_cache=cache) as base:
        base.complete(first, _greedy(12), timeout=T)
        base.complete(other, _greedy(4), timeout=T)  # `first` goes to host memory
        prompt = base.tokenize(first + follow_up)
    assert cache.stats().entries == 1

    tuned_config = EngineConfig(n_slots=1, n_ctx_per_slot=1024, adapters=(str(adapter),))
    for path, cfg in ((smollm2_path, tuned_config), (gemma_path, config)):
        with Engine(path, cfg, prompt_cache=cache) as engine:
            assert cache.longest(engine.fingerprint, np.asarray(prompt, np.int32)) == 0
            warm = engine.complete(prompt, _greedy(8), timeout=T)
            assert engine.stats().prompt_cache_hits == 0 and warm.usage.cached_tokens == 0
        with Engine(path, cfg) as engine:
            assert list(engine.complete(prompt, _greedy(8), timeout=T).tokens) == list(warm.tokens)


def test_a_state_that_fails_to_restore_is_dropped_and_recomputed(smollm2_path: Path) -> None:
    cache = PromptCache(1 << 30)
    config = EngineConfig(n_slots=1, n_ctx_per_slot=512)
    with Engine(smollm2_path, config, prompt_cache=cache) as engine:
        prompt = engine.tokenize(_text(7, 150))
        broken = (ctypes.c_uint8 * 64)()  # a header promising cells that are not there
        cache.put(engine.fingerprint, np.asarray(prompt[:100], np.int32), broken)
        done = engine.complete(prompt, _greedy(8), timeout=T)
        assert done.usage.cached_tokens == 0 and cache.stats().entries == 0
    with Engine(smollm2_path, config) as engine:
        assert list(engine.complete(prompt, _greedy(8), timeout=T).tokens) == list(done.tokens)


# ---- the cache's own rules (pure) ------------------------------------------------------------


def _state(n: int) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * n)()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    budget=st.integers(0, 4000),
    puts=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.lists(st.integers(0, 3), min_size=1, max_size=12),
            st.integers(1, 1500),
        ),
        max_size=30,
    ),
)
def test_cache_rules_hold_for_any_sequence_of_saves(
    budget: int, puts: list[tuple[str, list[int], int]]
) -> None:
    cache = PromptCache(budget)
    for fingerprint, tokens, size in puts:
        arr = np.asarray(tokens, np.int32)
        kept = cache.put(fingerprint, arr, _state(size))
        stats = cache.stats()
        assert stats.bytes <= budget
        assert kept == (size + arr.nbytes <= budget)
        if kept:  # the newest entry is never the one evicted, and is found whole
            entry, n = cache.best(fingerprint, arr)
            assert entry is not None and n == len(tokens)
            other = "b" if fingerprint == "a" else "a"
            assert cache.best(other, arr)[0] is not entry
    assert cache.stats().entries <= len(puts)


def test_a_longer_save_replaces_its_own_prefix() -> None:
    cache = PromptCache(10_000)
    cache.put("m", np.asarray([1, 2, 3], np.int32), _state(100))
    cache.put("m", np.asarray([1, 2, 3, 4, 5], np.int32), _state(100))
    assert cache.stats().entries == 1
    assert cache.covers("m", np.asarray([1, 2, 3, 4], np.int32))
    assert not cache.covers("other", np.asarray([1, 2], np.int32))
    entry, n = cache.best("m", np.asarray([1, 2, 3, 9], np.int32))
    assert entry is not None and n == 3


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        PromptCache(-1)
