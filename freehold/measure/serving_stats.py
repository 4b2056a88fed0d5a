"""Per-request timings to summary statistics, defined exactly as vLLM's `bench serve`.

- TTFT: request sent to the first streamed token.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request (requests with one token have none).
- ITL: every gap between streamed chunks, pooled over all requests.
- E2E: request sent to the last streamed token.
- Request throughput = completed / duration; output tok/s = sum(output tokens) / duration.
- Goodput = requests meeting every SLO / duration.
- Cached share = cached prompt tokens / prompt tokens, over the requests whose server said how
  many of their prompt tokens came from its cache (unknown is not zero).

Everything here is pure: records in, numbers out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from freehold.errors import InvalidInput

PERCENTILES = (50.0, 90.0, 99.0)
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `start` is relative to the run's start."""

    index: int
    start: float = 0.0
    success: bool = False
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    # Prompt tokens the server reused from its cache; None when it did not say.
    cached_tokens: int | None = None
    # Multi-turn workloads: which conversation (0-based) and which turn of it (1-based).
    user: int | None = None
    turn: int | None = None

    @property
    def tpot(self) -> float | None:
        if not self.success or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """Milliseconds, for `--save-raw`. Never carries prompt or output text."""

        def ms(x: float | None) -> float | None:
            return None if x is None else round(x * 1000.0, 4)

        return {
            "index": self.index,
            "start_ms": ms(self.start),
            "success": self.success,
            "ttft_ms": ms(self.ttft),
            "tpot_ms": ms(self.tpot),
            "e2e_ms": ms(self.e2e),
            "itl_ms": [ms(x) for x in self.itl],
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "user": self.user,
            "turn": self.turn,
            "error": self.error,
        }


@dataclass(frozen=True)
class Dist:
    """Mean, median, p90 and p99 of one metric, in milliseconds."""

    mean: float
    median: float
    p90: float
    p99: float
    count: int

    @staticmethod
    def of(values_s: list[float]) -> Dist:
        if not values_s:
            nan = float("nan")
            return Dist(nan, nan, nan, nan, 0)
        a = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(a, PERCENTILES)
        return Dist(float(a.mean()), float(p50), float(p90), float(p99), int(a.size))


@dataclass(frozen=True)
class TurnSummary:
    """One turn of a multi-turn workload, over every conversation."""

    turn: int
    completed: int
    failed: int
    prompt_tokens_median: float
    cached_share: float | None
    ttft_p50_ms: float
    ttft_p95_ms: float
    # The turn's output tokens over the wall time from its first request sent to its last
    # token: the turn's requests overlap other turns' when conversations run unevenly.
    output_throughput: float


@dataclass(frozen=True)
class Summary:
    """One load level's results (one concurrency, or one arrival rate)."""

    label: str
    concurrency: int | None
    rate: float | None
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None
    slo_ms: dict[str, float] | None
    ttft: Dist
    tpot: Dist
    itl: Dist
    e2e: Dist
    first_error: str | None = None
    total_cached_tokens: int | None = None
    cached_share: float | None = None
    # Multi-turn workloads only: per-turn figures, and the cached share from turn 2 on (turn 1
    # can only reuse the shared prefix; later turns show whether conversations keep theirs).
    turns: list[TurnSummary] = field(default_factory=list)
    cached_share_from_turn_2: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_slo(text: str | None) -> dict[str, float] | None:
    """`ttft=500,tpot=50,e2e=5000` (milliseconds) into a dict; None when not given."""
    if not text:
        return None
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise InvalidInput(
                f"bad --slo item {part!r}: use ttft=MS,tpot=MS,e2e=MS (any of the three)"
            )
        try:
            slo[key] = float(value)
        except ValueError:
            raise InvalidInput(f"bad --slo value {value!r} for {key}: give milliseconds") from None
        if slo[key] <= 0:
            raise InvalidInput(f"--slo {key} must be positive, got {value}")
    return slo


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    """A request is good when it succeeded and each given SLO holds (a missing TPOT passes)."""
    if not r.success:
        return False
    got = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    for key, limit_ms in slo.items():
        value = got[key]
        if value is None:
            # vLLM skips TPOT for single-token outputs; TTFT and E2E always exist on success.
            continue
        if value * 1000.0 > limit_ms:
            return False
    return True


def cached_tokens(records: list[RequestRecord]) -> tuple[int | None, float | None]:
    """Cached prompt tokens and their share of the prompt tokens, over the successful requests
    whose server reported its cache use; (None, None) when none did."""
    known = [r for r in records if r.success and r.cached_tokens is not None and r.prompt_tokens]
    if not known:
        return None, None
    cached = sum(r.cached_tokens or 0 for r in known)
    return cached, cached / sum(r.prompt_tokens for r in known)


def _percentile_ms(values_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values_s) * 1000.0, q)) if values_s else float("nan")


def summarize_turns(records: list[RequestRecord]) -> list[TurnSummary]:
    """Per-turn figures for records that carry a turn number; [] when none do."""
    turns = sorted({r.turn for r in records if r.turn is not None})
    return [_turn_summary(t, [r for r in records if r.turn == t]) for t in turns]


def _turn_summary(turn: int, records: list[RequestRecord]) -> TurnSummary:
    ok = [r for r in records if r.success]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    span = 0.0
    if ok:
        span = max(r.start + (r.e2e or 0.0) for r in ok) - min(r.start for r in ok)
    prompts = [r.prompt_tokens for r in ok]
    return TurnSummary(
        turn=turn,
        completed=len(ok),
        failed=len(records) - len(ok),
        prompt_tokens_median=float(np.median(prompts)) if prompts else float("nan"),
        cached_share=cached_tokens(ok)[1],
        ttft_p50_ms=_percentile_ms(ttfts, 50.0),
        ttft_p95_ms=_percentile_ms(ttfts, 95.0),
        output_throughput=sum(r.output_tokens for r in ok) / span if span > 0 else 0.0,
    )


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    *,
    label: str = "",
    concurrency: int | None = None,
    rate: float | None = None,
    slo: dict[str, float] | None = None,
) -> Summary:
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    duration = max(duration_s, 1e-9)
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    n_cached, share = cached_tokens(ok)
    later = [r for r in ok if r.turn is not None and r.turn >= 2]
    goodput = None
    if slo is not None:
        goodput = sum(1 for r in ok if meets_slo(r, slo)) / duration
    return Summary(
        label=label,
        concurrency=concurrency,
        rate=rate,
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        request_throughput=len(ok) / duration,
        output_throughput=n_out / duration,
        total_token_throughput=(n_in + n_out) / duration,
        goodput=goodput,
        slo_ms=slo,
        ttft=Dist.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Dist.of([t for r in ok if (t := r.tpot) is not None]),
        itl=Dist.of([gap for r in ok for gap in r.itl]),
        e2e=Dist.of([r.e2e for r in ok if r.e2e is not None]),
        first_error=failed[0].error if failed else None,
        total_cached_tokens=n_cached,
        cached_share=share,
        turns=summarize_turns(records),
        cached_share_from_turn_2=cached_tokens(later)[1],
    )
