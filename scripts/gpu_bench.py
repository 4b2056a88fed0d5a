"""Freehold's server against llama.cpp's llama-server on a GPU, both fully offloaded.

Run by scripts/gpu-check.sh (which builds llama-server and the CUDA libllama Freehold loads
through LLAMA_CPP_LIB_PATH, from one sdist); not part of `make bench`, which has no GPU. The
measuring is benchmarks/bench_server.py's: streaming /v1/completions, 128 output tokens with
EOS ignored, closed-loop clients, levels interleaved and the first server rotated per repeat,
and the share of each level's wall time spent inside llama.cpp's decode (Freehold's own metric,
llama-server through the preloaded timer). Writes gpu-check.md and gpu-check.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_server import (  # noqa: E402 - the repository is put on the path first
    MIN_REQUESTS,
    OUTPUT_TOKENS,
    PROMPT_WORDS,
    Result,
    _level,
    decode_timer,
    logged_seconds,
    metric_seconds,
    prompts,
)
from benchmarks.common import ServerProcess, free_port, machine  # noqa: E402

TARGETS = {1: 0.95, 32: 1.0}  # issue 14: Freehold / llama-server at these concurrencies


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-server", type=Path, required=True, help="the CUDA llama-server")
    p.add_argument("--model", action="append", required=True, help="NAME=FILE.gguf (repeat)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ctx", type=int, default=1024, help="tokens per slot")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--llama-arg", action="append", default=[], help="extra llama-server flag")
    # For trying the script on a CPU machine (with a CPU llama-server): measure anyway.
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def _servers(model: Path, binary: Path, slots: int, a: argparse.Namespace, work: Path) -> list:
    env = {**os.environ, "FREEHOLD_HOME": str(work / "home")}
    timed = dict(os.environ)
    if shutil.which("cc"):  # the decode timer is compiled here; without it, no compute share
        timed["LD_PRELOAD"] = str(decode_timer())
        timed["FREEHOLD_BENCH_DECODE_LOG"] = str(work / "llama-server.decode")
    fport, lport = free_port(), free_port()
    freehold = ServerProcess(
        "freehold serve",
        [sys.executable, "-m", "freehold", "serve", "--model", str(model), "--slots", str(slots),
         "--threads", str(a.threads), "--ctx", str(a.ctx), "--port", str(fport),
         "--gpu-layers", "auto"],
        fport, work / "freehold.log", env, extra_body={"ignore_eos": True},
    )  # fmt: skip
    llama = ServerProcess(
        "llama.cpp llama-server",
        [str(binary), "-m", str(model), "-ngl", "999", "-fa", "on", "-t", str(a.threads),
         "-tb", str(a.threads), "--parallel", str(slots), "-c", str(slots * a.ctx),
         "--host", "127.0.0.1", "--port", str(lport), "--no-webui", *a.llama_arg],
        lport, work / "llama-server.log", timed, extra_body={"ignore_eos": True},
    )  # fmt: skip
    return [freehold, llama]


def _offload(server: ServerProcess, allow_cpu: bool) -> dict[str, Any]:
    """What Freehold says it offloaded (its /devices); the check fails unless it is all."""
    data = httpx.get(server.url + "/devices", timeout=30, trust_env=False).json()
    (plan,) = data["models"].values()
    if not allow_cpu and plan["gpu_layers"] <= plan["layers"]:
        raise SystemExit(f"Freehold did not offload the whole model: {plan.get('summary')}")
    return {"backend": data["backend"], **plan}


def _bench_model(name: str, model: Path, a: argparse.Namespace, levels: list[int]) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"freehold-gpu-{name}-"))
    group = _servers(model, a.llama_server, max(levels), a, work)
    probes = {
        group[0].name: metric_seconds(group[0]),
        group[1].name: logged_seconds(work / "llama-server.decode"),
    }
    runs: dict[str, dict[int, list[Result]]] = {s.name: {c: [] for c in levels} for s in group}
    with ExitStack() as stack:
        for s in group:
            stack.enter_context(s)
        offload = _offload(group[0], a.allow_cpu)
        print(f"{name}: {offload['summary']}", flush=True)
        for r in range(a.repeats):
            for c in levels:
                texts = prompts(max(c, MIN_REQUESTS), seed=1000 * r + c)
                for s in group[r % 2 :] + group[: r % 2]:
                    runs[s.name][c].append(asyncio.run(_level(s, texts, c, probes[s.name])))
    return {"model": name, "file": str(model), "offload": offload, "runs": runs}


def _summary(res: dict, levels: list[int]) -> dict[str, Any]:
    runs = res["runs"]
    ours, anchor = list(runs)
    out: dict[str, Any] = {"model": res["model"], "offload": res["offload"], "levels": {}}
    for c in levels:
        ratios = [a.tok_s / b.tok_s for a, b in zip(runs[ours][c], runs[anchor][c], strict=True)]
        out["levels"][c] = {
            "freehold_tok_s": statistics.median(x.tok_s for x in runs[ours][c]),
            "llama_server_tok_s": statistics.median(x.tok_s for x in runs[anchor][c]),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "freehold_busy": statistics.median(x.busy or 0.0 for x in runs[ours][c]),
            "llama_server_busy": statistics.median(x.busy or 0.0 for x in runs[anchor][c]),
            "freehold_ttft_ms": 1000 * statistics.median(t for x in runs[ours][c] for t in x.ttfts),
            "llama_server_ttft_ms": 1000
            * statistics.median(t for x in runs[anchor][c] for t in x.ttfts),
            "short": sum(x.short for x in runs[ours][c] + runs[anchor][c]),
        }
    return out


def _markdown(summaries: list[dict], a: argparse.Namespace, gpu: str, levels: list[int]) -> str:
    head = (
        "| model | c | Freehold tok/s | llama-server tok/s | ratio | target | in decode (F / L) |"
    )
    lines = [
        f"GPU: {gpu}. Host: {machine()}.",
        f"Both servers fully offloaded from one CUDA build of the llama-cpp-python sdist; "
        f"{a.threads} threads, {max(levels)} slots of {a.ctx} tokens; streaming /v1/completions, "
        f"{PROMPT_WORDS}-word prompts, {OUTPUT_TOKENS} output tokens (EOS ignored); max(c, "
        f"{MIN_REQUESTS}) requests per level; {a.repeats} interleaved repeats, medians; ratio = "
        "median of per-repeat Freehold / llama-server.",
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for c, v in s["levels"].items():
            target = TARGETS.get(c)
            verdict = (
                "-"
                if target is None
                else f"≥ {target:.2f}x " + ("met" if v["ratio"] >= target else "MISSED")
            )
            lines.append(
                f"| {s['model']} | {c} | {v['freehold_tok_s']:.0f} | "
                f"{v['llama_server_tok_s']:.0f} | **{v['ratio']:.2f}x** | {verdict} | "
                f"{v['freehold_busy']:.0%} / {v['llama_server_busy']:.0%} |"
            )
    lines.append("")
    lines += [f"- {s['model']}: {s['offload']['summary']}" for s in summaries]
    return "\n".join(lines) + "\n"


def main() -> None:
    a = _args()
    levels = [int(x) for x in a.concurrency.split(",")]
    models = dict(m.split("=", 1) for m in a.model)
    gpu = os.environ.get("FREEHOLD_GPU_NAME", "unknown GPU")
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summaries = []
    for name, file in models.items():
        summaries.append(_summary(_bench_model(name, Path(file), a, levels), levels))
        # Written after each model, so a run cut short still leaves what it measured.
        report = _markdown(summaries, a, gpu, levels)
        (a.out / "gpu-check.md").write_text(report)
        data = {"gpu": gpu, "seconds": time.monotonic() - started, "results": summaries}
        (a.out / "gpu-check.json").write_text(json.dumps(data, indent=2, default=str))
    print(report, flush=True)


if __name__ == "__main__":
    main()
