"""Engine throughput and latency on SmolLM2, side by side with llama-cpp-python's `Llama`.

Measures, with 2 threads, interleaved over repeats (medians):
- single-stream decode tok/s: `Llama` (high-level, streaming) vs the Engine;
- aggregate decode tok/s of the Engine with 4 and 8 concurrent sequences;
- TTFT of a chat whose ~1,000-token system prompt is cold vs already in the prefix cache.

Decode rates are steady-state: tokens produced inside a window in which every stream is
decoding, divided by the window's length (prefill excluded). Prints a Markdown table.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid

from benchmarks.common import machine, smollm2_path

THREADS = 2
REPEATS = int(os.environ.get("FREEHOLD_BENCH_REPEATS", "5"))
DECODE_TOKENS = 160
WINDOW_S = 1.2
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def _llama_decode_rate(llm, eos: int) -> float:  # noqa: ANN001 - llama_cpp.Llama
    stamps: list[float] = []
    stream = llm.create_completion(
        PROMPT,
        max_tokens=DECODE_TOKENS,
        temperature=0.0,
        repeat_penalty=1.0,
        logit_bias={eos: -1e9},
        stream=True,
    )
    for _ in stream:
        stamps.append(time.perf_counter())
    # Skip the first token (it carries the prompt's prefill), as for the engine.
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])


def _engine_decode_rate(engine, n_streams: int) -> float:  # noqa: ANN001 - freehold Engine
    from freehold.engine import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=4096, ignore_eos=True)
    # Distinct prompts so each stream has its own sequence (a suffix defeats the prefix cache).
    handles = [engine.submit(f"{PROMPT} ({i})", sp) for i in range(n_streams)]
    try:
        deadline = time.monotonic() + 60
        # Wait until every stream has produced a token (all prefills done).
        while time.monotonic() < deadline:
            if all(_first_token_seen(h) for h in handles):
                break
            time.sleep(0.002)
        t0, n0 = time.perf_counter(), engine.stats().tokens_generated
        time.sleep(WINDOW_S)
        t1, n1 = time.perf_counter(), engine.stats().tokens_generated
        assert engine.stats().running == n_streams, "a stream ended inside the window"
        return (n1 - n0) / (t1 - t0)
    finally:
        for h in handles:
            h.cancel()
        for h in handles:
            h.result(timeout=60)


def _first_token_seen(handle) -> bool:  # noqa: ANN001
    return handle._sync.qsize() > 0 or handle.done


def _ttft(engine, system: str, question: str) -> float:  # noqa: ANN001
    from freehold.engine import SamplingParams

    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    r = engine.chat(msgs, SamplingParams(temperature=0.0, max_tokens=1)).result(timeout=120)
    return r.timings.ttft_s


def _system_prompt(engine, target_tokens: int = 1000) -> str:  # noqa: ANN001
    nonce = uuid.uuid4().hex[:8]
    rules = [f"Rule {i}: answer politely, cite sources, and keep it short." for i in range(200)]
    text = f"[{nonce}] You are a support assistant for Freehold."
    for r in rules:
        if len(engine.tokenize(text + " " + r)) > target_tokens:
            break
        text += " " + r
    return text


def main() -> None:
    import llama_cpp

    from freehold.engine import Engine, EngineConfig

    path = smollm2_path()
    llm = llama_cpp.Llama(
        str(path), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )
    eos = llama_cpp.llama_vocab_eos(llama_cpp.llama_model_get_vocab(llm.model))
    engine = Engine(path, EngineConfig(n_slots=8, n_ctx_per_slot=2048, n_threads=THREADS))
    load_before = os.getloadavg()[0]
    res: dict[str, list[float]] = {k: [] for k in ("llama", "e1", "e4", "e8", "cold", "warm")}
    _engine_decode_rate(engine, 1)  # warm-up: page in weights, allocate buffers
    _llama_decode_rate(llm, eos)
    for _ in range(REPEATS):
        res["llama"].append(_llama_decode_rate(llm, eos))
        res["e1"].append(_engine_decode_rate(engine, 1))
        res["e4"].append(_engine_decode_rate(engine, 4))
        res["e8"].append(_engine_decode_rate(engine, 8))
        system = _system_prompt(engine)
        res["cold"].append(_ttft(engine, system, "How do I reset my password?"))
        res["warm"].append(_ttft(engine, system, "Where can I download my invoices?"))
    n_system = len(engine.tokenize(system))
    engine.close()
    llm.close()
    med = {k: statistics.median(v) for k, v in res.items()}

    def paired(a: str, b: str) -> float:
        # Ratio within each repeat, then the median: measurements taken seconds apart share
        # the machine's load, so paired ratios shrug off load that drifts between repeats.
        return statistics.median(x / y for x, y in zip(res[a], res[b], strict=True))

    rows = [
        ("Single-stream decode, llama-cpp-python `Llama`", f"{med['llama']:.1f} tok/s", "1.00x"),
        (
            "Single-stream decode, Freehold engine",
            f"{med['e1']:.1f} tok/s",
            f"**{paired('e1', 'llama'):.2f}x** of `Llama` (target >= 0.95x)",
        ),
        (
            "Aggregate decode, 4 concurrent sequences",
            f"{med['e4']:.1f} tok/s",
            f"{paired('e4', 'e1'):.2f}x of single-stream",
        ),
        (
            "Aggregate decode, 8 concurrent sequences",
            f"{med['e8']:.1f} tok/s",
            f"**{paired('e8', 'e1'):.2f}x** of single-stream (target >= 1.5x)",
        ),
        (f"TTFT, cold {n_system}-token system prompt", f"{med['cold'] * 1000:.0f} ms", "1.00x"),
        (
            "TTFT, same system prompt cached",
            f"{med['warm'] * 1000:.0f} ms",
            f"**{paired('warm', 'cold'):.3f}x** of cold (target <= 0.2x)",
        ),
    ]
    print(f"Machine: {machine()}; {THREADS} threads; SmolLM2-135M-Instruct Q4_1.")
    print(
        f"Medians of {REPEATS} interleaved repeats (ratios: median of per-repeat ratios); "
        f"load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after.\n"
    )
    print("| Measure | Median | Ratio |")
    print("|---|---|---|")
    for name, value, ratio in rows:
        print(f"| {name} | {value} | {ratio} |")
    print()
    print(
        "All runs: " + "; ".join(f"{k}=" + ",".join(f"{x:.3g}" for x in v) for k, v in res.items())
    )


if __name__ == "__main__":
    main()
