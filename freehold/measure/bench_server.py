"""`freehold bench --url`: a whole benchmark run against a server, as a library call.

Builds the prompts (synthetic, sized with the server's own token counts, or a JSONL dataset),
runs each load level, saves raw timings if asked and records throughput for `freehold cost`.
The multi-turn and agent workloads (see `workloads`) run one level of conversations instead.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from freehold.config import Paths
from freehold.errors import InvalidInput
from freehold.measure import loadgen, measurements, workloads
from freehold.measure.loadgen import LOOPBACK, Level, OnDone, Prompt, Target
from freehold.measure.serving_stats import Summary
from freehold.measure.workloads import WorkloadSpec

RANDOM_INPUT_LEN = RANDOM_OUTPUT_LEN = 128


@dataclass
class BenchOptions:
    target: Target
    concurrency: list[int] | None = None
    rates: list[float] | None = None
    burstiness: float = 1.0
    input_len: int | None = None  # None: 128 for random prompts, the workload's default else
    output_len: int | None = None
    num_prompts: int = 32
    dataset: Path | None = None
    slo: dict[str, float] | None = None
    seed: int = 0
    calibrate: bool = True
    workload: str = "random"
    users: int | None = None  # multi-turn and agent: None takes the workload's default
    turns: int | None = None
    prefix_len: int | None = None

    def spec(self) -> WorkloadSpec:
        """The multi-turn or agent workload these options ask for."""
        return WorkloadSpec.of(
            self.workload,
            users=self.users,
            turns=self.turns,
            prefix_len=self.prefix_len,
            input_len=self.input_len,
            output_len=self.output_len,
        )


@dataclass
class BenchResult:
    options: BenchOptions
    levels: list[Level]
    words_per_prompt: int | None = None
    recorded: measurements.Throughput | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def summaries(self) -> list[Summary]:
        return [lv.summary for lv in self.levels]

    def to_json(self) -> dict[str, Any]:
        rec = self.recorded
        return {
            "meta": self.meta,
            "levels": [s.to_json() for s in self.summaries],
            "recorded_throughput": None if rec is None else rec.__dict__,
        }


def parse_rates(text: str) -> list[float]:
    """`0.5,1,inf` into floats."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput("--rate takes requests per second, e.g. 2 or 1,2,4 or inf") from None
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise InvalidInput("--rate values must be positive")
    return rates


def discover_model(target: Target) -> str:
    """The first model the server lists at /v1/models, for when --model is not given."""
    url = target.request_url.rsplit("/v1/", 1)[0] + "/v1/models"
    host = urlparse(url).hostname or ""
    try:
        r = httpx.get(url, headers=target.headers(), timeout=10.0, trust_env=host not in LOOPBACK)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError):
        raise InvalidInput(f"--model not given and {url} did not list one: pass --model") from None


def _sizes(opts: BenchOptions) -> tuple[int, int]:
    """Input and output tokens of the random workload's prompts."""
    n_in = RANDOM_INPUT_LEN if opts.input_len is None else opts.input_len
    return n_in, RANDOM_OUTPUT_LEN if opts.output_len is None else opts.output_len


def _prompts(opts: BenchOptions, n_levels: int) -> tuple[list[list[Prompt]], int | None]:
    chat = opts.target.endpoint == "chat"
    input_len, output_len = _sizes(opts)
    if opts.dataset is not None:
        prompts = loadgen.load_dataset(opts.dataset, output_len, opts.num_prompts, chat)
        return [prompts] * n_levels, None
    words = input_len
    if opts.calibrate:
        words = asyncio.run(loadgen.calibrate_words(opts.target, input_len, opts.seed))
    # Fresh prompts for every level, so a prefix cache warmed by one level cannot flatter the next.
    every = loadgen.synthetic_prompts(
        opts.num_prompts * n_levels, words, output_len, opts.seed, chat
    )
    n = opts.num_prompts
    return [every[i * n : (i + 1) * n] for i in range(n_levels)], words


def run_bench(
    opts: BenchOptions,
    *,
    on_level: Callable[[str, int], None] | None = None,
    on_done: OnDone | None = None,
    record: bool = True,
    home: Paths,
) -> BenchResult:
    """Every load level against `opts.target`; with `record`, keeps the throughput in `home`."""
    loadgen.check_target(opts.target)
    if opts.workload != "random":
        return _run_workload(opts, on_level, on_done)
    if opts.rates:
        plan: list[tuple[int | None, float | None]] = [
            (opts.concurrency[0] if opts.concurrency else None, r) for r in opts.rates
        ]
        if opts.concurrency and len(opts.concurrency) > 1:
            raise InvalidInput("with --rate, --concurrency is one cap on requests in flight")
    else:
        plan = [(c, None) for c in (opts.concurrency or [1])]
    per_level, words = _prompts(opts, len(plan))
    levels = []
    for (conc, rate), prompts in zip(plan, per_level, strict=True):
        label = f"rate {rate:g}/s" if rate is not None else f"concurrency {conc}"
        if on_level:
            on_level(label, len(prompts))
        levels.append(
            loadgen.run_level(
                opts.target,
                prompts,
                concurrency=conc,
                rate=rate,
                burstiness=opts.burstiness,
                seed=opts.seed,
                slo=opts.slo,
                on_done=on_done,
            )
        )
    result = BenchResult(opts, levels, words)
    input_len, output_len = _sizes(opts)
    result.meta = {
        "url": opts.target.url,
        "model": opts.target.model,
        "endpoint": opts.target.request_url,
        "prompts": str(opts.dataset)
        if opts.dataset
        else f"synthetic: {input_len} input tokens ({words} words), {output_len} output",
        "prompts per level": len(per_level[0]),
        "burstiness": opts.burstiness if opts.rates else "-",
        "slo ms": json.dumps(opts.slo) if opts.slo else "-",
    }
    _check_some_succeeded(opts.target, levels)
    if record:
        prefill, decode, detail = loadgen.throughput_for_cost(levels)
        detail["url"] = opts.target.url
        result.recorded = measurements.record_throughput(
            opts.target.model,
            decode,
            prefill,
            source=f"bench --url {opts.target.url}",
            detail=detail,
            home=home,
        )
    return result


def _check_some_succeeded(target: Target, levels: list[Level]) -> None:
    if all(lv.summary.completed == 0 for lv in levels):
        first = next((lv.summary.first_error for lv in levels if lv.summary.first_error), "")
        raise InvalidInput(f"no request to {target.request_url} succeeded: {first}")


def _run_workload(
    opts: BenchOptions,
    on_level: Callable[[str, int], None] | None,
    on_done: OnDone | None,
) -> BenchResult:
    """One level of conversations: --users chats at once, each --turns turns long."""
    if opts.concurrency or opts.rates or opts.dataset:
        raise InvalidInput(
            f"--workload {opts.workload} sets its own load (--users conversations at once, "
            "--turns each): drop --concurrency, --rate and --dataset"
        )
    spec = opts.spec()
    target = workloads.chat_target(opts.target)
    sizing = workloads.Sizing.uncalibrated(spec)
    if opts.calibrate:
        sizing = asyncio.run(workloads.calibrate(target, spec, opts.seed))
    script = workloads.build_script(spec, opts.seed, sizing)
    if on_level:
        on_level(spec.label, spec.users * spec.turns)
    level = workloads.run_script(target, script, slo=opts.slo, on_done=on_done)
    _check_some_succeeded(target, [level])
    prefix = "tool definitions" if spec.kind == "agent" else "system prompt"
    unit = "tokens" if opts.calibrate else "words"
    result = BenchResult(opts, [level], sizing.message_words)
    result.meta = {
        "url": target.url,
        "model": target.model,
        "endpoint": target.request_url,
        "workload": spec.label,
        "prompts": f"shared {prefix} {spec.prefix_len} {unit} ({sizing.prefix_words} words), "
        f"user messages {spec.input_len} {unit} ({sizing.message_words} words), "
        f"{spec.output_len} output tokens a reply; history re-sent every turn",
        "seed": opts.seed,
        "slo ms": json.dumps(opts.slo) if opts.slo else "-",
        # Shared prefixes make prompt tokens / TTFT a cache figure, not a prefill rate.
        "recorded for cost": "no: use the random workload",
    }
    return result


def save_raw(result: BenchResult, path: Path) -> Path:
    """Per-request timings, one JSON object a line, tagged with the load level. No text."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for lv in result.levels:
            for rec in lv.records:
                row = {"level": lv.summary.label, **rec.to_json()}
                f.write(json.dumps(row) + "\n")
    return path
