"""`freehold bench MODEL`: an engine micro-benchmark in the manner of llama.cpp's `llama-bench`.

Three tests, each repeated and reported as mean ± sample standard deviation:

- pp N: prompt processing, N random prompt tokens, one generated; the engine's prefill rate
  (prompt tokens / time from admission to the first token);
- tg N: token generation for one sequence from a one-token prompt, N tokens with EOS ignored;
  the engine's decode rate ((N - 1) / time after the first token);
- tg N xS: S sequences generating N tokens each at once; aggregate tokens after each one's
  first token / time from the earliest first token to the last finish.

Random token ids (as llama-bench uses) and no prefix cache, so no repeat is flattered by a
previous one. One untimed warm-up pages the weights in first. The results are recorded for
`freehold cost`: prefill from pp, decode from the best aggregate tg (the machine's capacity).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from freehold.config import Paths
from freehold.engine import Completion, Engine, EngineConfig, RequestHandle, SamplingParams
from freehold.engine.devices import GpuLayers
from freehold.errors import FreeholdError, InvalidInput
from freehold.measure import measurements
from freehold.vault import ModelSpec, resolve_model_spec

SOURCE = "freehold bench (engine)"
RESULT_TIMEOUT_S = 600.0  # per request: a stuck engine fails the run instead of hanging it
WARMUP_PP, WARMUP_TG = 16, 4

# (test label, completed steps, total steps)
OnProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EngineBenchOptions:
    pp: int = 128
    tg: int = 64
    repeats: int = 5
    sequences: tuple[int, ...] = (1, 2, 4, 8)
    threads: int | None = None
    seed: int = 0
    gpu_layers: GpuLayers = "auto"  # `--gpu-layers`: auto, N or 0

    def validate(self) -> EngineBenchOptions:
        for name in ("pp", "tg", "repeats"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.tg < 2:
            raise InvalidInput("--tg must be at least 2: decode speed is timed after token one")
        if any(s < 1 for s in self.sequences):
            raise InvalidInput("--sequences values must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise InvalidInput(f"--threads must be at least 1, got {self.threads}")
        return self


@dataclass(frozen=True)
class Stat:
    """Tokens per second over the repeats."""

    mean: float
    sd: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        xs = list(samples)
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return cls(statistics.fmean(xs), sd, xs)


@dataclass(frozen=True)
class TestResult:
    test: str  # llama-bench style: pp128, tg64, tg64 x4
    sequences: int
    tokens_per_s: Stat


@dataclass
class EngineBenchResult:
    model: str
    path: str
    adapters: list[str]
    threads: int
    options: EngineBenchOptions
    pp: TestResult
    tg: TestResult
    aggregate: list[TestResult]
    recorded: measurements.Throughput | None = None
    offload: str = ""  # what the engine put on the GPU, in words

    @property
    def tests(self) -> list[TestResult]:
        """Each distinct test once (tg is also the x1 aggregate)."""
        return [self.pp, self.tg, *(t for t in self.aggregate if t.sequences != 1)]

    def best_decode(self) -> TestResult:
        """The highest generation rate: what the machine sustains when it is kept busy."""
        return max([self.tg, *self.aggregate], key=lambda t: t.tokens_per_s.mean)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"]["sequences"] = list(self.options.sequences)
        return d


# ---- one measurement ------------------------------------------------------------------------


def _random_prompt(engine: Engine, n: int, rng: random.Random) -> list[int]:
    """`n` random token ids, BOS first when the model wants one (llama-bench does the same)."""
    tokens = [rng.randrange(engine.model.n_vocab) for _ in range(n)]
    if engine.model.add_bos and engine.model.bos_id >= 0:
        tokens[0] = engine.model.bos_id
    return tokens


def _collect(handles: list[RequestHandle]) -> list[Completion]:
    done = [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]
    failed = next((c for c in done if c.finish_reason == "error"), None)
    if failed is not None:
        raise FreeholdError(f"the engine failed a benchmark request: {failed.error}")
    return done


def measure_pp(engine: Engine, n: int, rng: random.Random) -> float:
    """Prefill rate of one `n`-token prompt (one token is generated to end the request)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    (c,) = _collect([engine.submit(_random_prompt(engine, n, rng), params)])
    return c.timings.prefill_tokens_per_s


def measure_tg(engine: Engine, n: int, sequences: int, rng: random.Random) -> float:
    """Aggregate decode rate of `sequences` requests generating `n` tokens each at once.

    Tokens after each request's first / time from the earliest first token to the last
    finish; for one sequence that is exactly the engine's own decode rate.
    """
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    handles = [engine.submit(_random_prompt(engine, 1, rng), params) for _ in range(sequences)]
    done = _collect(handles)
    short = [c.usage.completion_tokens for c in done if c.usage.completion_tokens != n]
    if short:
        raise FreeholdError(f"a sequence stopped after {short[0]} of {n} tokens")
    # Absolute times on the perf_counter clock: handle.submitted_at + the request's offsets.
    pairs = list(zip(handles, done, strict=True))
    first = min(h.submitted_at + c.timings.ttft_s for h, c in pairs)
    last = max(h.submitted_at + c.timings.total_s for h, c in pairs)
    return sequences * (n - 1) / max(last - first, 1e-9)


# ---- the run --------------------------------------------------------------------------------


def open_engine(spec: ModelSpec, config: EngineConfig) -> Engine:
    """An engine on `spec`'s base model with its LoRA adapters (if any) applied."""
    adapters = tuple(str(a) for a in spec.adapters)
    return Engine(spec.path, replace(config, adapters=adapters), name=spec.ref)


def bench_config(opts: EngineBenchOptions) -> EngineConfig:
    slots = max(opts.sequences, default=1)
    return EngineConfig(
        n_slots=slots,
        n_threads=opts.threads,
        n_ctx_per_slot=max(opts.pp, opts.tg, WARMUP_PP) + 16,
        max_queue=slots,
        prefix_cache=False,  # every repeat computes its whole prompt
        gpu_layers=opts.gpu_layers,
    )


def _plan(opts: EngineBenchOptions) -> list[tuple[str, int]]:
    """Every timed test as (label, sequences); 0 sequences marks prompt processing.

    tg for one sequence is always run: it is both the plain tg test and the x1 aggregate.
    """
    seqs = sorted(set(opts.sequences) | {1})
    return [(f"pp{opts.pp}", 0)] + [(_tg_label(opts.tg, s), s) for s in seqs]


def _tg_label(n: int, sequences: int) -> str:
    return f"tg{n}" if sequences == 1 else f"tg{n} x{sequences}"


def _measure(engine: Engine, opts: EngineBenchOptions, seqs: int, rng: random.Random) -> float:
    if seqs == 0:
        return measure_pp(engine, opts.pp, rng)
    return measure_tg(engine, opts.tg, seqs, rng)


def run_engine_bench(
    model: str | ModelSpec,
    opts: EngineBenchOptions | None = None,
    *,
    on_progress: OnProgress | None = None,
    record: bool = True,
    home: Paths,
) -> EngineBenchResult:
    """Load `model` (vault name in `home`, .gguf path or BASE+ADAPTER), run every test, and with
    `record` keep the rates in `home`."""
    opts = (opts or EngineBenchOptions()).validate()
    spec = model if isinstance(model, ModelSpec) else resolve_model_spec(model, home)
    rng = random.Random(opts.seed)
    plan = _plan(opts)
    total = 1 + len(plan) * opts.repeats
    samples: dict[int, list[float]] = {seqs: [] for _, seqs in plan}
    with open_engine(spec, bench_config(opts)) as engine:
        _report(on_progress, "warm-up", 0, total)
        measure_pp(engine, WARMUP_PP, rng)
        measure_tg(engine, WARMUP_TG, max(opts.sequences, default=1), rng)
        step = 1
        for _ in range(opts.repeats):  # interleaved, so a slow spell hits every test alike
            for test, seqs in plan:
                _report(on_progress, test, step, total)
                samples[seqs].append(_measure(engine, opts, seqs, rng))
                step += 1
        _report(on_progress, "done", total, total)
        threads = engine.n_threads
        offload = engine.offload.summary
    results = {seqs: TestResult(test, seqs, Stat.of(samples[seqs])) for test, seqs in plan}
    out = EngineBenchResult(
        model=spec.ref,
        path=str(spec.path),
        adapters=[str(a) for a in spec.adapters],
        threads=threads,
        options=opts,
        pp=results[0],
        tg=results[1],
        aggregate=[results[s] for s in sorted(set(opts.sequences))],
        offload=offload,
    )
    if record:
        out.recorded = _record(out, home)
    return out


def _report(on_progress: OnProgress | None, test: str, done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(test, done, total)


def _record(r: EngineBenchResult, home: Paths) -> measurements.Throughput:
    best = r.best_decode()
    detail = {
        "decode_from": f"{best.test} (engine, mean of {r.options.repeats})",
        "prefill_from": f"{r.pp.test} (engine, mean of {r.options.repeats})",
        "threads": r.threads,
        "adapters": r.adapters,
    }
    return measurements.record_throughput(
        r.model, best.tokens_per_s.mean, r.pp.tokens_per_s.mean, SOURCE, detail, home=home
    )
