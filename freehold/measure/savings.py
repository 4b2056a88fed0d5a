"""`freehold savings`: what the tokens the server actually served cost here, against APIs.

Tokens come from the server's usage ledger (`freehold/server/ledger.py`, table `requests`),
grouped by key, model or UTC day, optionally since a date. For each model, the cost here is
`freehold cost`'s own per-1M figures (cost profile + that model's measured throughput at the
profile's utilisation) times its input and output tokens; each comparator of the price sheet
prices the same input and output tokens at its own list prices. Tokens of a model with no
measured throughput are counted but not costed (neither here nor on any API), and named.
Cached prompt tokens are priced as ordinary input on both sides.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freehold.config import Paths
from freehold.errors import FreeholdError, InvalidInput
from freehold.measure import cost_formulas, cost_report, hardware, prices, upstream_prices
from freehold.server.ledger import connect

# SQL for each --by, over the ledger's `requests` table (ts is ISO-8601 UTC).
GROUPS = {
    "key": "COALESCE(key_name, '-')",
    "model": "COALESCE(model, '-')",
    "day": "substr(ts, 1, 10)",
}
TOTAL = "total"


@dataclass(frozen=True)
class ModelUsage:
    """Ledger totals for one model within one group."""

    group: str
    model: str
    requests: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Rate:
    """What 1M tokens of one model cost here, and where its throughput came from."""

    model: str
    input_per_mtok: float
    output_per_mtok: float
    prefill_tps: float
    decode_tps: float
    throughput_origin: str
    priced_as: str | None = None  # an upstream's tokens: the price row they cost (not hardware)


@dataclass(frozen=True)
class ApiCost:
    """The same tokens on one comparator, priced input and output separately."""

    comparator: str
    kind: str
    as_of: str
    source: str
    input_per_mtok: float
    output_per_mtok: float
    usd: float
    savings_pct: float | None  # None when no token could be costed


@dataclass
class GroupSavings:
    group: str
    requests: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    costed_prompt_tokens: int = 0  # tokens of models with measured throughput
    costed_completion_tokens: int = 0
    here_usd: float = 0.0
    unmeasured_models: list[str] = field(default_factory=list)
    apis: list[ApiCost] = field(default_factory=list)


@dataclass
class SavingsReport:
    by: str
    since: str | None
    utilisation: float
    hourly_usd: float
    assumed_inputs: list[str]
    rates: list[Rate]
    groups: list[GroupSavings]
    total: GroupSavings
    price_sheet: str
    generated_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- the ledger -----------------------------------------------------------------------------


def parse_since(text: str | None) -> str | None:
    """`YYYY-MM-DD` (or a full ISO timestamp) as the ledger's UTC timestamp prefix."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"--since takes a date like 2026-01-31, got {text!r}") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.isoformat(timespec="milliseconds")


def read_usage(ledger: Path, by: str, since: str | None = None) -> list[ModelUsage]:
    """Ledger totals per (group, model), from `since` (inclusive) on."""
    if by not in GROUPS:
        raise InvalidInput(f"--by must be one of {', '.join(GROUPS)}, not {by!r}")
    if not ledger.exists():
        return []
    where, args = ("WHERE ts >= ?", (since,)) if since else ("", ())
    db = connect(ledger)
    try:
        rows = db.execute(
            f"SELECT {GROUPS[by]} AS g, COALESCE(model, '-') AS m, COUNT(*), "
            "SUM(status >= 400), SUM(prompt_tokens), SUM(cached_tokens), "
            f"SUM(completion_tokens) FROM requests {where} GROUP BY g, m ORDER BY g, m",
            args,
        ).fetchall()
    finally:
        db.close()
    return [
        ModelUsage(g, m, n, failed or 0, p or 0, c or 0, comp or 0)
        for g, m, n, failed, p, c, comp in rows
    ]


# ---- costing --------------------------------------------------------------------------------


def rate_for(model: str, home: Paths, machine: hardware.Machine) -> Rate | None:
    """`freehold cost`'s per-1M figures for `model`; None when its throughput is unmeasured."""
    try:
        rep = cost_report.build_report(model=model, home=home, machine=machine)
    except InvalidInput:
        return None
    loc = rep.local
    return Rate(
        model,
        loc.input_per_mtok,
        loc.output_per_mtok,
        rep.prefill_tps,
        rep.decode_tps,
        rep.throughput_origin,
    )


def model_rate(
    model: str,
    home: Paths,
    machine: hardware.Machine,
    upstream: dict[str, str],
    sheet: Iterable[prices.Price],
) -> Rate | None:
    """An upstream model (`--upstream …,price=ROW`) costs its row's list price; a local one,
    this machine's cost at its measured throughput. None: neither can be known."""
    row = upstream.get(model)
    if row is None:
        return rate_for(model, home, machine)
    price = upstream_prices.find(sheet, row)
    if price is None:  # named, but not on the sheet in use: left uncosted, and named
        return None
    origin = f"upstream list price as of {price.as_of}"
    return Rate(model, price.input_per_mtok, price.output_per_mtok, 0.0, 0.0, origin, price.name)


def usd(prompt_tokens: int, completion_tokens: int, input_per_mtok: float, out: float) -> float:
    return (prompt_tokens * input_per_mtok + completion_tokens * out) / 1e6


def _add(g: GroupSavings, u: ModelUsage, rate: Rate | None) -> None:
    g.requests += u.requests
    g.failed += u.failed
    g.prompt_tokens += u.prompt_tokens
    g.cached_tokens += u.cached_tokens
    g.completion_tokens += u.completion_tokens
    if rate is None:
        if u.model not in g.unmeasured_models and u.prompt_tokens + u.completion_tokens:
            g.unmeasured_models.append(u.model)
        return
    g.costed_prompt_tokens += u.prompt_tokens
    g.costed_completion_tokens += u.completion_tokens
    g.here_usd += usd(
        u.prompt_tokens, u.completion_tokens, rate.input_per_mtok, rate.output_per_mtok
    )


def _price_apis(g: GroupSavings, sheet: Iterable[prices.Price]) -> None:
    costed = g.costed_prompt_tokens + g.costed_completion_tokens > 0
    for pr in sheet:
        api = usd(
            g.costed_prompt_tokens,
            g.costed_completion_tokens,
            pr.input_per_mtok,
            pr.output_per_mtok,
        )
        g.apis.append(
            ApiCost(
                pr.name,
                pr.kind,
                pr.as_of,
                pr.source,
                pr.input_per_mtok,
                pr.output_per_mtok,
                api,
                cost_formulas.savings_pct(g.here_usd, api) if costed else None,
            )
        )


def build_savings(
    *,
    by: str = "key",
    since: str | None = None,
    price_file: Path | None = None,
    only: list[str] | None = None,
    home: Paths,
    machine: hardware.Machine | None = None,
) -> SavingsReport:
    usage = read_usage(home.ledger, by, parse_since(since))
    sheet = prices.filter_prices(prices.load_prices(price_file), only)
    if not sheet:
        raise InvalidInput(f"no price rows match --only {' '.join(only or [])}")
    machine = machine or hardware.detect()
    upstream = upstream_prices.load(home)
    full_sheet = prices.load_prices(price_file)  # an upstream's row need not pass --only
    rates = {
        m: model_rate(m, home, machine, upstream, full_sheet)
        for m in sorted({u.model for u in usage})
    }
    groups: dict[str, GroupSavings] = {}
    total = GroupSavings(TOTAL)
    for u in usage:
        _add(groups.setdefault(u.group, GroupSavings(u.group)), u, rates[u.model])
        _add(total, u, rates[u.model])
    ordered = sorted(groups.values(), key=_order(by))
    for g in [*ordered, total]:
        _price_apis(g, sheet)
    profile = hardware.load_profile(home)
    inputs = profile.cost_inputs()
    assumed = [k for k, o in profile.origin.items() if "assumed" in o]
    return SavingsReport(
        by=by,
        since=since,
        utilisation=inputs.utilisation,
        hourly_usd=_hourly(inputs),
        assumed_inputs=assumed,
        rates=[r for r in rates.values() if r is not None],
        groups=ordered,
        total=total,
        price_sheet=str(price_file) if price_file else "bundled price sheet",
    )


def _order(by: str) -> Callable[[GroupSavings], Any]:
    """Days in date order; keys and models biggest token users first."""
    if by == "day":
        return lambda g: g.group
    return lambda g: (-(g.prompt_tokens + g.completion_tokens), g.group)


def _hourly(inputs: cost_formulas.CostInputs) -> float:
    try:
        return cost_formulas.hourly(inputs).total
    except ValueError as e:
        raise FreeholdError(f"the cost profile is incomplete: {e}") from None
