"""`freehold serve` against llama.cpp's C++ `llama-server` and llama-cpp-python's server.

Same model (SmolLM2-135M-Instruct Q4_1), 2 threads, 8 slots, the same prompts; streaming
/v1/completions, 128 output tokens per request (EOS suppressed: `ignore_eos` for Freehold and
llama-server, a -inf logit bias on the end tokens for llama-cpp-python, which has no
`ignore_eos`), closed-loop clients at concurrency 1, 2, 4, 8. The three servers run side by
side in one process tree and the levels are interleaved, so they see the same machine state.

Besides tok/s, each level records how much of its wall time each server spent inside llama.cpp:
Freehold from its own `freehold_engine_compute_seconds_total`, llama-server through a small
`llama_process` timer preloaded into it (LD_PRELOAD). Host speed drifts between levels, and
the compute per output token drifts with it; the share of wall time spent computing does not.

Set up on first run, outside the repository (~/.cache/freehold-bench, or $FREEHOLD_BENCH_CACHE):
- llama-server, built from the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist
  (`pip download --no-binary`), cmake -DLLAMA_CURL=OFF, target llama-server (several minutes);
- the llama_process timer, compiled with `cc` (decode-timer.so);
- llama-cpp-python's server extras (sse-starlette, starlette-context, pydantic-settings,
  python-dotenv) installed with `pip --target` into that cache, never into the project venv.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import ServerProcess, end_token_bias, free_port, machine, smollm2_path
from freehold.engine.model import cpu_has_amx

LLAMA_CPP_PYTHON = "0.3.36"
CONCURRENCY = (1, 2, 4, 8)
OUTPUT_TOKENS = 128
THREADS = 2
SLOTS = 8
CTX_PER_SLOT = 1024
PROMPT_WORDS = 48
MIN_REQUESTS = 8  # per level: one or two 128-token requests alone are too noisy to compare
SERVER_EXTRAS = ("sse-starlette", "starlette-context", "pydantic-settings", "python-dotenv")


def cache_dir() -> Path:
    d = Path(os.environ.get("FREEHOLD_BENCH_CACHE", Path.home() / ".cache" / "freehold-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--quiet", *args], check=True)


def llama_server_binary() -> Path:
    """Build llama-server from the sdist's vendored llama.cpp once; reuse it afterwards."""
    cache = cache_dir()
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    binary = src / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        _pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(cache),
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}")  # fmt: skip
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    print("building llama-server (several minutes on 2 cores)…", file=sys.stderr, flush=True)
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(src / "build"), "-DLLAMA_CURL=OFF",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(src / "build"), "--target", "llama-server",
         "-j", str(os.cpu_count() or 2)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return binary


# llama-server decodes through llama_process(); this wrapper, preloaded into it, appends each
# call's seconds to $FREEHOLD_BENCH_DECODE_LOG. Freehold reports the same figure itself
# (freehold_engine_compute_seconds_total), so both servers' time inside llama.cpp is known.
DECODE_TIMER_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int32_t llama_process(void *ctx, int type, void *batch) {
    static int32_t (*real)(void *, int, void *);
    static FILE *log;
    if (!real) {
        real = (int32_t (*)(void *, int, void *))dlsym(RTLD_NEXT, "llama_process");
        const char *path = getenv("FREEHOLD_BENCH_DECODE_LOG");
        log = path ? fopen(path, "a") : NULL;
    }
    double t0 = now();
    int32_t rc = real(ctx, type, batch);
    if (log) {
        fprintf(log, "%.6f\n", now() - t0);
        fflush(log);
    }
    return rc;
}
"""


def decode_timer() -> Path:
    """Compile the llama_process timer once into the cache (a C compiler is already needed)."""
    lib = cache_dir() / "decode-timer.so"
    if not lib.is_file():
        src = cache_dir() / "decode-timer.c"
        src.write_text(DECODE_TIMER_C)
        tmp = lib.with_suffix(".so.tmp")
        subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src), "-ldl"], check=True
        )
        tmp.replace(lib)
    return lib


def logged_seconds(path: Path) -> Callable[[], float]:
    """A probe: total seconds logged so far by the decode timer."""
    return lambda: sum(map(float, path.read_text().split())) if path.exists() else 0.0


def metric_seconds(server: ServerProcess) -> Callable[[], float]:
    """A probe: Freehold's own count of seconds inside llama_decode, from its /metrics."""

    def probe() -> float:
        text = httpx.get(server.url + "/metrics", timeout=10, trust_env=False).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "freehold_engine_compute_seconds_total"
        )

    return probe


def llama_cpp_python_site() -> Path:
    """llama-cpp-python's [server] extras in a directory of their own (put on PYTHONPATH)."""
    site = cache_dir() / "llama-cpp-python-server-site"
    if not (site / "sse_starlette").is_dir():
        _pip("install", "--no-deps", "--target", str(site), *SERVER_EXTRAS)
    return site


def servers(model: Path, work: Path) -> list[ServerProcess]:
    env = {**os.environ, "FREEHOLD_HOME": str(work / "home")}
    timed = {
        **os.environ,
        "LD_PRELOAD": str(decode_timer()),
        "FREEHOLD_BENCH_DECODE_LOG": str(work / "llama-server.decode"),
    }
    fport, lport, pport = free_port(), free_port(), free_port()
    freehold = ServerProcess(
        "freehold serve",
        [sys.executable, "-m", "freehold", "serve", "--model", str(model), "--slots", str(SLOTS),
         "--threads", str(THREADS), "--ctx", str(CTX_PER_SLOT), "--port", str(fport)],
        fport, work / "freehold.log", env, extra_body={"ignore_eos": True},
    )  # fmt: skip
    llama = ServerProcess(
        "llama.cpp llama-server",
        [str(llama_server_binary()), "-m", str(model), "-t", str(THREADS), "-tb", str(THREADS),
         "--parallel", str(SLOTS), "-c", str(SLOTS * CTX_PER_SLOT), "--host", "127.0.0.1",
         "--port", str(lport), "--no-webui",
         # The same weights layout as Freehold's engine on AMX CPUs (see engine/model.py).
         *(["--no-repack"] if cpu_has_amx() else [])],
        lport, work / "llama-server.log", timed, extra_body={"ignore_eos": True},
    )  # fmt: skip
    penv = {**os.environ, "PYTHONPATH": str(llama_cpp_python_site())}
    lcp = ServerProcess(
        "llama-cpp-python server",
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads",
         str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", str(CTX_PER_SLOT),
         "--host", "127.0.0.1", "--port", str(pport),
         # Queue concurrent requests (its default cuts a running stream off for a new one).
         "--interrupt_requests", "False"],
        pport, work / "llama-cpp-python.log", penv,
        extra_body={"logit_bias": end_token_bias(model)},
    )  # fmt: skip
    return [freehold, llama, lcp]


def prompts(n: int, seed: int = 4) -> list[str]:
    """`n` distinct prompts of PROMPT_WORDS words; another seed gives another set."""
    import random

    words = (
        "river stone light garden window paper market winter silver engine forest music "
        "harbor letter mountain candle bridge orange shadow travel simple yellow morning "
        "hammer island kitchen pocket velvet thunder"
    ).split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(PROMPT_WORDS)) for _ in range(n)]


@dataclass
class Result:
    tokens: int
    seconds: float
    ttfts: list[float]
    short: int  # requests that returned fewer than OUTPUT_TOKENS
    compute: float | None = None  # seconds inside llama.cpp's decode during the level

    @property
    def busy(self) -> float | None:
        """Share of the level's wall time spent computing in llama.cpp (the rest is overhead)."""
        return None if self.compute is None else self.compute / self.seconds

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


async def _one(client: httpx.AsyncClient, server: ServerProcess, prompt: str) -> tuple[int, float]:
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **server.extra_body,
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    usage_tokens = None
    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    tokens += 1
    return (usage_tokens if usage_tokens is not None else tokens), ttft or 0.0


async def _level(
    server: ServerProcess,
    texts: list[str],
    concurrency: int,
    probe: Callable[[], float] | None = None,
) -> Result:
    queue = list(texts)
    done: list[tuple[int, float]] = []
    # A fresh connection per request: llama-server (cpp-httplib) closes a connection after a
    # few requests, and a pooled one it has just closed fails the next request.
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await _one(client, server, "warm up")  # connection and server warm-up, untimed

        async def worker() -> None:
            while queue:
                done.append(await _one(client, server, queue.pop()))

        c0 = probe() if probe else None
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
        compute = probe() - c0 if probe and c0 is not None else None
    tokens = sum(n for n, _ in done)
    short = sum(n < OUTPUT_TOKENS for n, _ in done)
    return Result(tokens, seconds, [t for _, t in done], short, compute)


def main() -> None:
    # Short levels, many repeats: on a shared machine speed drifts within seconds, so the two
    # sides of a ratio are measured as close together in time as possible.
    repeats = int(os.environ.get("FREEHOLD_BENCH_REPEATS", "5"))
    per_client = int(os.environ.get("FREEHOLD_BENCH_REQUESTS_PER_CLIENT", "1"))
    levels = _levels(os.environ.get("FREEHOLD_BENCH_CONCURRENCY", ""))
    # FREEHOLD_BENCH_SKIP_LCP=1: Freehold and llama-server only (a focused run is twice as long
    # per level without llama-cpp-python's serialising server).
    skip_lcp = os.environ.get("FREEHOLD_BENCH_SKIP_LCP") == "1"
    work = Path(tempfile.mkdtemp(prefix="freehold-bench-server-"))
    group = servers(smollm2_path(), work)[: 2 if skip_lcp else 3]
    probes = {
        group[0].name: metric_seconds(group[0]),
        group[1].name: logged_seconds(work / "llama-server.decode"),
    }
    with ExitStack() as stack:
        for s in group:
            stack.enter_context(s)
        runs: dict[tuple[str, int], list[Result]] = {}
        for r in range(repeats):
            for c in levels:
                # Fresh prompts per level and repeat, the same for each server: a prompt seen
                # before would be served from a server's prompt cache and skip its prefill.
                texts = prompts(max(per_client * c, MIN_REQUESTS), seed=1000 * r + c)
                # Rotate who goes first, so drift on a shared machine favours no one.
                for s in group[r % len(group) :] + group[: r % len(group)]:
                    result = asyncio.run(_level(s, texts, c, probes.get(s.name)))
                    runs.setdefault((s.name, c), []).append(result)
        _report(group, runs, repeats, per_client, levels)


def _report_compute(
    runs: dict[tuple[str, int], list[Result]], ours: str, anchor: str, levels: tuple[int, ...]
) -> None:
    """Where each level's wall time went: llama.cpp compute versus the server's own overhead.

    Host speed drifts between levels, and compute per output token with it (that ratio shows
    how far the machine moved under a level); the share of time computing stays put.
    """
    print("\n| time inside llama.cpp's decode | " + " | ".join(f"c={c}" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for name in (ours, anchor):
        shares = [statistics.median(r.busy or 0.0 for r in runs[(name, c)]) for c in levels]
        print(f"| {name} | " + " | ".join(f"{x:.1%}" for x in shares) + " |")
    per_token = {
        c: statistics.median(
            (a.compute or 0.0) / a.tokens / ((b.compute or 1.0) / b.tokens)
            for a, b in zip(runs[(ours, c)], runs[(anchor, c)], strict=True)
        )
        for c in levels
    }
    print(
        "llama.cpp compute per output token, Freehold / llama-server (median of per-repeat "
        "ratios): " + ", ".join(f"c={c}: {r:.2f}x" for c, r in per_token.items())
    )


def _levels(spec: str) -> tuple[int, ...]:
    """FREEHOLD_BENCH_CONCURRENCY, e.g. "8" or "1,8"; empty means all of CONCURRENCY."""
    if not spec.strip():
        return CONCURRENCY
    try:
        levels = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(
            f"FREEHOLD_BENCH_CONCURRENCY must be a comma list of integers, got {spec!r}"
        ) from None
    if any(c < 1 for c in levels):
        raise SystemExit(f"FREEHOLD_BENCH_CONCURRENCY levels must be >= 1, got {spec!r}")
    return levels


def _report(
    group: list[ServerProcess],
    runs: dict[tuple[str, int], list[Result]],
    repeats: int,
    per_client: int,
    levels: tuple[int, ...],
) -> None:
    ours, anchor = group[0].name, group[1].name
    print(f"Machine: {machine()}; load average at the end: {os.getloadavg()[0]:.1f}")
    print(
        f"Model: SmolLM2-135M-Instruct Q4_1; {THREADS} threads, {SLOTS} slots of "
        f"{CTX_PER_SLOT} tokens; streaming /v1/completions, {PROMPT_WORDS}-word prompts, "
        f"{OUTPUT_TOKENS} output tokens each; {per_client} x concurrency requests "
        f"(min {MIN_REQUESTS}) per "
        "level; "
        f"{repeats} interleaved repeats, medians\n"
    )
    med = {k: statistics.median(r.tok_s for r in v) for k, v in runs.items()}
    top = max(levels)
    print("| server | " + " | ".join(f"c={c} tok/s" for c in levels) + f" | TTFT c={top} |")
    print("|---|" + "---|" * (len(levels) + 1))
    for s in group:
        cells = [f"{med[(s.name, c)]:.0f}" for c in levels]
        ttft = statistics.median(t for r in runs[(s.name, top)] for t in r.ttfts) * 1000
        print(f"| {s.name} | " + " | ".join(cells) + f" | {ttft:.0f} ms |")
    # Ratios per repeat (both sides measured back to back), then the median.
    per_repeat = {
        c: [a.tok_s / b.tok_s for a, b in zip(runs[(ours, c)], runs[(anchor, c)], strict=True)]
        for c in levels
    }
    print(
        "\nFreehold / llama-server (median of per-repeat ratios): "
        + ", ".join(f"c={c}: **{statistics.median(r):.2f}x**" for c, r in per_repeat.items())
        + " (targets: ≥ 0.95x at c=1, ≥ 1.0x at c=8)"
    )
    print(
        f"Per-repeat ratios at c={top}, sorted: "
        + ", ".join(f"{r:.2f}" for r in sorted(per_repeat[top]))
        + f" ({sum(r >= 1.0 for r in per_repeat[top])} of {repeats} at or above 1.0)"
    )
    _report_compute(runs, ours, anchor, levels)
    if len(group) > 2:
        lcp = group[2].name
        print(
            "Freehold / llama-cpp-python server: "
            + ", ".join(f"c={c}: {med[(ours, c)] / med[(lcp, c)]:.2f}x" for c in levels)
        )
    raw = "; ".join(
        f"{s.name} c={c}: " + ",".join(f"{r.tok_s:.0f}" for r in runs[(s.name, c)])
        for s in group
        for c in levels
    )
    print(f"\nAll runs (tok/s): {raw}")
    short = {s.name: sum(r.short for c in levels for r in runs[(s.name, c)]) for s in group}
    if any(short.values()):
        print(f"\nRequests that stopped before {OUTPUT_TOKENS} tokens: {short}")


if __name__ == "__main__":
    main()
