"""Conversations: `freehold serve` against llama.cpp's `llama-server` on multi-turn chat and agents.

Real chat clients and coding agents re-send the whole conversation every turn, so what a server
keeps in its KV cache decides how long a turn takes. Both servers run SmolLM2-135M-Instruct Q4_1
with 2 threads, each with its default caching (Freehold: slot affinity and the host-memory
prompt cache; llama-server: `--slot-prompt-similarity` and its `--cache-ram` defaults), and get
the workloads of `freehold bench --url … --workload` (freehold/measure/workloads.py):
- multi-turn: 8 users × 4 turns, a shared ~300-token system prompt, 32-token user messages,
  64-token replies re-sent as history; 8 slots of 2048 tokens;
- agent: 4 agents × 8 turns after a 4,000-token fixed prefix (tool definitions as text),
  32-token messages and replies; 4 slots of 6144 tokens.
The user side of each round comes from its seed (the same for both servers); sizes are
calibrated once, on Freehold's token counts. Rounds interleave the servers (Freehold,
llama-server, Freehold, …), so both see the same machine state; every round is a set of new
conversations. llama-server reports its reuse as `timings.cache_n`, Freehold as
`usage.prompt_tokens_details.cached_tokens`.

`python -m benchmarks bench_cache` (or `make bench`); FREEHOLD_BENCH_ROUNDS (default 3) and
FREEHOLD_BENCH_WORKLOADS (default multi-turn,agent) narrow a run.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_server import llama_server_binary
from benchmarks.common import ServerProcess, free_port, machine, smollm2_path
from freehold.engine.model import cpu_has_amx
from freehold.measure import workloads
from freehold.measure.loadgen import Level, Target
from freehold.measure.workloads import Sizing, WorkloadSpec

THREADS = 2


@dataclass(frozen=True)
class Setup:
    spec: WorkloadSpec
    slots: int
    ctx_per_slot: int


SETUPS = {
    "multi-turn": Setup(WorkloadSpec.of("multi-turn"), slots=8, ctx_per_slot=2048),
    "agent": Setup(WorkloadSpec.of("agent"), slots=4, ctx_per_slot=6144),
}


def servers(model: Path, work: Path, setup: Setup) -> list[ServerProcess]:
    env = {**os.environ, "FREEHOLD_HOME": str(work / "home")}
    fport, lport = free_port(), free_port()
    freehold = ServerProcess(
        "freehold serve",
        [sys.executable, "-m", "freehold", "serve", "--model", str(model),
         "--slots", str(setup.slots), "--threads", str(THREADS),
         "--ctx", str(setup.ctx_per_slot), "--port", str(fport)],
        fport, work / "freehold.log", env, extra_body={"ignore_eos": True},
    )  # fmt: skip
    llama = ServerProcess(
        "llama.cpp llama-server",
        [str(llama_server_binary()), "-m", str(model), "-t", str(THREADS), "-tb", str(THREADS),
         "--parallel", str(setup.slots), "-c", str(setup.slots * setup.ctx_per_slot),
         "--host", "127.0.0.1", "--port", str(lport), "--no-webui",
         # The same weights layout as Freehold's engine on AMX CPUs (see engine/model.py).
         *(["--no-repack"] if cpu_has_amx() else [])],
        lport, work / "llama-server.log", extra_body={"ignore_eos": True},
    )  # fmt: skip
    return [freehold, llama]


def _target(server: ServerProcess) -> Target:
    return Target(server.url, server.model, endpoint="chat", extra_body=server.extra_body)


def _run(server: ServerProcess, setup: Setup, sizing: Sizing, seed: int) -> Level:
    script = workloads.build_script(setup.spec, seed, sizing)
    return workloads.run_script(_target(server), script)


def _turn_ttfts(level: Level) -> dict[int, float]:
    """Median time to first token of each turn, in ms."""
    by_turn: dict[int, list[float]] = {}
    for r in level.records:
        if r.success and r.ttft is not None and r.turn is not None:
            by_turn.setdefault(r.turn, []).append(r.ttft * 1000.0)
    return {t: statistics.median(v) for t, v in sorted(by_turn.items())}


def _median_ttft(level: Level, first_turn: int = 1) -> float:
    xs = [
        r.ttft * 1000.0
        for r in level.records
        if r.success and r.ttft is not None and (r.turn or 1) >= first_turn
    ]
    return statistics.median(xs)


def bench(name: str, rounds: int) -> dict[str, list[Level]]:
    setup = SETUPS[name]
    model = smollm2_path()
    runs: dict[str, list[Level]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        procs = [stack.enter_context(p) for p in servers(model, Path(tmp), setup)]
        sizing = asyncio.run(workloads.calibrate(_target(procs[0]), setup.spec))
        for rnd in range(rounds):
            for p in procs:
                level = _run(p, setup, sizing, seed=100 + rnd)
                runs.setdefault(p.name, []).append(level)
                s = level.summary
                print(
                    f"  {name} round {rnd + 1}, {p.name}: {s.completed} ok, {s.failed} failed, "
                    f"cached {_pct(s.cached_share)} (from turn 2: "
                    f"{_pct(s.cached_share_from_turn_2)}), {s.output_throughput:.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _report_multi_turn(runs: dict[str, list[Level]]) -> None:
    print("| server | cached share by round | from turn 2, by round | output tok/s by round |")
    print("|---|---|---|---|")
    for name, levels in runs.items():
        share = ", ".join(_pct(lv.summary.cached_share) for lv in levels)
        later = ", ".join(_pct(lv.summary.cached_share_from_turn_2) for lv in levels)
        tok = ", ".join(f"{lv.summary.output_throughput:.1f}" for lv in levels)
        print(f"| {name} | {share} | {later} | {tok} |")
    fh, ls = (statistics.median(lv.summary.output_throughput for lv in v) for v in runs.values())
    ratios = [
        a.summary.output_throughput / b.summary.output_throughput
        for a, b in zip(*runs.values(), strict=True)
    ]
    print(
        f"\nOutput tok/s, median of rounds: Freehold {fh:.1f}, llama-server {ls:.1f}; "
        f"Freehold / llama-server per round: {', '.join(f'{r:.2f}x' for r in ratios)} "
        f"(median {statistics.median(ratios):.2f}x)."
    )


def _report_agent(runs: dict[str, list[Level]]) -> None:
    turns = sorted({t for v in runs.values() for lv in v for t in _turn_ttfts(lv)})
    print("Median TTFT (ms) per turn, median over rounds:\n")
    print("| server | " + " | ".join(f"turn {t}" for t in turns) + " | turn 8 / turn 2 |")
    print("|---|" + "---|" * (len(turns) + 1))
    for name, levels in runs.items():
        per_round = [_turn_ttfts(lv) for lv in levels]
        med = {t: statistics.median(r[t] for r in per_round if t in r) for t in turns}
        flat = med[turns[-1]] / med[2] if 2 in med else float("nan")
        cells = " | ".join(f"{med[t]:.0f}" for t in turns)
        print(f"| {name} | {cells} | {flat:.2f}x |")
    print("\n| server | median TTFT, all turns (ms) | from turn 2 (ms) | cached share by round |")
    print("|---|---|---|---|")
    for name, levels in runs.items():
        all_turns = statistics.median(_median_ttft(lv) for lv in levels)
        later = statistics.median(_median_ttft(lv, 2) for lv in levels)
        share = ", ".join(_pct(lv.summary.cached_share) for lv in levels)
        print(f"| {name} | {all_turns:.0f} | {later:.0f} | {share} |")


def main() -> None:
    rounds = int(os.environ.get("FREEHOLD_BENCH_ROUNDS", "3"))
    names = os.environ.get("FREEHOLD_BENCH_WORKLOADS", "multi-turn,agent").split(",")
    print(f"Machine: {machine()}; SmolLM2-135M-Instruct Q4_1, {THREADS} threads, {rounds} rounds")
    print("Command: python -m benchmarks bench_cache\n")
    for name in names:
        setup = SETUPS[name]
        print(f"### {setup.spec.label} ({setup.slots} slots of {setup.ctx_per_slot} tokens)\n")
        runs = bench(name, rounds)
        (_report_multi_turn if name == "multi-turn" else _report_agent)(runs)
        print()


if __name__ == "__main__":
    main()
