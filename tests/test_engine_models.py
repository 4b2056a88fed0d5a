"""A second model (Gemma 3 270M, a base model) beside SmolLM2: residency and base-model rules."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from freehold.engine import (
    ChatTemplateError,
    Delta,
    Engine,
    EngineConfig,
    ModelPool,
    SamplingParams,
)

T = 120
CFG = EngineConfig(n_slots=2, n_ctx_per_slot=512, n_threads=1)


def test_base_model_refuses_chat_but_completes(gemma_path: Path) -> None:
    with Engine(gemma_path, CFG) as eng:
        assert eng.chat_template is None
        with pytest.raises(ChatTemplateError, match="no chat template"):
            eng.chat([{"role": "user", "content": "Hi"}])
        r = eng.complete(
            "The capital of France is", SamplingParams(temperature=0, max_tokens=12), timeout=T
        )
        assert r.text.strip() and r.usage.completion_tokens > 0


def test_second_model_loads_while_first_keeps_streaming(
    smollm2_path: Path, gemma_path: Path
) -> None:
    with ModelPool(config=CFG, keep_alive_s=600) as pool:
        smol = pool.get(str(smollm2_path), timeout=T)
        sp = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        arrivals: list[float] = []
        h = smol.submit("Write a long story about a lighthouse keeper.", sp)
        started = threading.Event()

        def consume() -> None:
            for ev in h.events(timeout=T):
                if isinstance(ev, Delta):
                    arrivals.append(time.perf_counter())
                    started.set()

        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(T)
        t0 = time.perf_counter()
        gemma = pool.load(str(gemma_path)).result(T)
        t1 = time.perf_counter()
        h.cancel()
        t.join(T)
        during = [a for a in arrivals if t0 <= a <= t1]
        assert len(during) >= 2, f"{len(during)} tokens arrived during a {t1 - t0:.2f}s load"
        assert sorted(pool.loaded()) == sorted([str(smollm2_path), str(gemma_path)])
        assert gemma.complete("Hello", SamplingParams(temperature=0, max_tokens=4), timeout=T).text


def test_pool_unloads_least_recently_used_and_idle(smollm2_path: Path, gemma_path: Path) -> None:
    small, other = str(smollm2_path), str(gemma_path)
    with ModelPool(config=CFG, keep_alive_s=600) as pool:
        pool.get(small, timeout=T)
        # A budget that holds one of the two: loading the second evicts the idle first.
        pool.budget_bytes = pool.estimate_bytes(gemma_path) + (16 << 20)
        pool.get(other, timeout=T)
        assert pool.loaded() == [other]
    with ModelPool(config=CFG, keep_alive_s=0.3) as pool:
        pool.get(small, timeout=T)
        deadline = time.monotonic() + 10
        while pool.loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.loaded() == []
