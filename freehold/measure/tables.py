"""Rich renderings of measure results for the terminal. Pure presentation: no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from freehold.measure.cost_formulas import LocalCost
from freehold.measure.cost_report import CostReport, Row
from freehold.measure.eval import EvalResult
from freehold.measure.report import TURN_HEADER, TURN_NOTE, fmt, share, turn_rows
from freehold.measure.savings import GroupSavings, SavingsReport
from freehold.measure.serving_stats import Summary

if TYPE_CHECKING:  # the engine loads llama.cpp: keep it out of `cost` and `bench --url`
    from freehold.measure.bench_engine import EngineBenchResult


def bench_tables(title: str, levels: Sequence[Summary]) -> Group:
    summary = Table(title=title, title_justify="left")
    summary.add_column("load", no_wrap=True)
    for col in (
        "done",
        "failed",
        "secs",
        "req/s",
        "out tok/s",
        "all tok/s",
        "goodput req/s",
        "cached",
    ):
        summary.add_column(col, justify="right")
    for s in levels:
        summary.add_row(
            s.label,
            str(s.completed),
            str(s.failed),
            fmt(s.duration_s),
            fmt(s.request_throughput),
            fmt(s.output_throughput, 1),
            fmt(s.total_token_throughput, 1),
            fmt(s.goodput),
            share(s.cached_share),
        )
    lat = Table(
        title="Latency (ms); TPOT = (E2E - TTFT) / (out - 1), ITL = pooled chunk gaps",
        title_justify="left",
    )
    for col in ("load", "metric", "mean", "median", "p90", "p99"):
        lat.add_column(col, justify="left" if col in ("load", "metric") else "right")
    for s in levels:
        for name, d in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
            lat.add_row(
                s.label if name == "TTFT" else "",
                name,
                fmt(d.mean, 1),
                fmt(d.median, 1),
                fmt(d.p90, 1),
                fmt(d.p99, 1),
            )
    parts: list[Table | Text] = [summary, lat]
    for s in levels:
        parts.extend(_turn_table(s))
    errors = [s for s in levels if s.first_error]
    for s in errors:
        parts.append(
            Text(f"{s.label}: {s.failed} failed, first error: {s.first_error}", style="yellow")
        )
    return Group(*parts)


def _turn_table(s: Summary) -> list[Table | Text]:
    """A multi-turn level by turn, and the cached share from turn 2 on."""
    if not s.turns:
        return []
    t = Table(title=f"{s.label}, by turn", title_justify="left")
    for col in TURN_HEADER:
        t.add_column(col, justify="left" if col == "turn" else "right")
    for row in turn_rows(s):
        t.add_row(*row)
    later = share(s.cached_share_from_turn_2)
    return [
        t,
        Text(f"Cached share from turn 2 on: {later}", style="bold"),
        Text(TURN_NOTE, style="dim"),
    ]


def eval_table(r: EvalResult) -> Table:
    t = Table(
        title=f"Quality on {r.text}: ctx {r.ctx}, {r.chunks} chunks, "
        f"{r.tokens_scored} tokens scored (second half of each chunk)",
        title_justify="left",
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row(f"perplexity of {r.model}", f"{r.perplexity:.4f} ± {r.perplexity_err:.4f}")
    if r.reference is not None:
        t.add_row(f"perplexity of reference {r.reference}", fmt(r.reference_perplexity, 4))
        t.add_row("mean KL(reference || model)", fmt(r.mean_kl, 6))
        t.add_row("median KL", fmt(r.median_kl, 6))
        t.add_row("99th percentile KL", fmt(r.kl_p99, 6))
        t.add_row("max KL", fmt(r.max_kl, 6))
        t.add_row("top-1 agreement", f"{(r.top1_agreement or 0) * 100:.2f}%")
    return t


def _money(x: float) -> str:
    return f"${x:,.4f}" if x < 1 else f"${x:,.2f}"


def cost_tables(rep: CostReport) -> Group:
    m = rep.machine
    u = f"{rep.utilisation:.0%}"
    head = Text(
        f"This machine: {m.cpu}, {m.cores} cores, {m.ram_gib:.1f} GiB RAM, "
        f"GPU: {', '.join(m.gpus) or 'none'}"
    )
    inputs = Table(title="Inputs", title_justify="left")
    for col in ("input", "value", "unit", "origin"):
        inputs.add_column(col)
    for i in rep.inputs:
        style = "yellow" if "assumed" in i.origin else None
        inputs.add_row(i.name, str(i.value), i.unit, i.origin, style=style)
    loc = rep.local
    h = loc.hourly
    local = Text(
        f"Here, at {u} utilisation: {_money(loc.input_per_mtok)} per 1M input tokens, "
        f"{_money(loc.output_per_mtok)} per 1M output tokens, {_money(loc.blended_per_mtok)} "
        f"blended 3:1. Hourly cost {_money(h.total)} = hardware {_money(h.hardware)} + energy "
        f"{_money(h.energy)} + ops {_money(h.ops)}.",
        style="bold",
    )
    tables = []
    for kind, heading in (
        ("frontier closed", "Frontier closed APIs"),
        ("open-weight", "Hosted open-weight APIs"),
        ("unknown", "Other APIs"),
    ):
        rows = sorted((r for r in rep.rows if r.price.kind == kind), key=lambda r: r.price.name)
        if rows:
            tables.append(_comparator_table(f"{heading} vs here at {u} utilisation", rows, loc))
    cap = rep.rows[0].comparison.capacity_mtok_per_month if rep.rows else 0.0
    foot = Text(
        f"Throughput: {rep.throughput_origin}. Capacity flat out: {fmt(cap, 1)}M blended "
        "tokens/month. Break-even: monthly volume where the machine's fixed monthly cost equals "
        "API spend.",
        style="dim",
    )
    parts = [head, inputs, local, *tables, foot]
    if len(rep.rows) > 40:
        parts.append(Text(f"{len(rep.rows)} comparators: narrow them with --only NAME."))
    return Group(*parts)


def _short_date(as_of: str) -> str:
    return as_of.split(" (")[0]


def _comparator_table(title: str, rows: list[Row], loc: LocalCost) -> Table:
    """One row per comparator: its price and date beside the local price, then savings."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("comparator (price date)", overflow="fold", min_width=16, ratio=1)
    for col in ("API $/1M in/out", "here $/1M in/out", "saving in/out/3:1", "break-even Mtok/mo"):
        t.add_column(col, justify="right", overflow="fold")
    here = f"{_num(loc.input_per_mtok)}/{_num(loc.output_per_mtok)}"
    for r in rows:
        c = r.comparison
        be = c.break_even_mtok_per_month
        be_text = "never" if be is None else fmt(be, 1)
        if be is not None and not c.break_even_within_capacity:
            be_text += " >capacity"
        t.add_row(
            f"{r.price.name} ({_short_date(r.price.as_of)})",
            f"{_num(r.price.input_per_mtok)}/{_num(r.price.output_per_mtok)}",
            here,
            f"{c.input_savings_pct:.0f}/{c.output_savings_pct:.0f}/{c.blended_savings_pct:.0f}%",
            be_text,
        )
    return t


def _num(x: float) -> str:
    """Three significant figures: 0.028, 0.267, 1.5, 30."""
    return f"{x:.3g}"


def engine_bench_table(r: EngineBenchResult) -> Group:
    """llama-bench's layout: one row per test, tokens per second as mean ± sd."""
    adapters = f" with {len(r.adapters)} adapter(s)" if r.adapters else ""
    head = Text(f"{r.model}{adapters}: {r.threads} threads, {r.options.repeats} repeats")
    if r.offload:
        head.append(f"; {r.offload}")
    t = Table()
    for col in ("test", "sequences", "t/s"):
        t.add_column(col, justify="left" if col == "test" else "right")
    for test in r.tests:
        s = test.tokens_per_s
        t.add_row(test.test, str(max(test.sequences, 1)), f"{s.mean:.2f} ± {s.sd:.2f}")
    parts: list[Table | Text] = [head, t]
    rec = r.recorded
    if rec is not None:
        parts.append(
            Text(
                f"Recorded for `freehold cost --model {rec.model}`: prefill "
                f"{rec.prefill_tps or 0:.1f} tok/s ({rec.detail['prefill_from']}), decode "
                f"{rec.decode_tps:.1f} tok/s ({rec.detail['decode_from']}).",
                style="dim",
            )
        )
    return Group(*parts)


def _usd(x: float) -> str:
    """Dollars, with enough digits that small ledgers do not read as $0.0000."""
    return _money(x) if x >= 0.01 else f"${x:.3g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"  # None: nothing costed


def savings_tables(r: SavingsReport) -> Group:
    since = f" since {r.since}" if r.since else ""
    head = Text(
        f"Tokens served{since} by {r.by}, costed here at {r.utilisation:.0%} utilisation "
        f"({_usd(r.hourly_usd)}/h) with each model's measured throughput.",
        style="bold",
    )
    parts: list[Table | Text] = [head]
    for rate in r.rates:
        if rate.priced_as is not None:
            parts.append(
                Text(
                    f"  {rate.model}: {_usd(rate.input_per_mtok)} in / "
                    f"{_usd(rate.output_per_mtok)} out per 1M on its upstream, priced as "
                    f"{rate.priced_as} ({rate.throughput_origin})",
                    style="dim",
                )
            )
            continue
        parts.append(
            Text(
                f"  {rate.model}: {_usd(rate.input_per_mtok)} in / {_usd(rate.output_per_mtok)} "
                f"out per 1M here; prefill {rate.prefill_tps:.0f}, decode {rate.decode_tps:.0f} "
                f"tok/s, {_origins(rate.throughput_origin)}",
                style="dim",
            )
        )
    if r.assumed_inputs:
        parts.append(
            Text(
                f"Assumed cost inputs (defaults): {', '.join(r.assumed_inputs)}; set them with "
                "`freehold cost --set KEY=VALUE`.",
                style="yellow",
            )
        )
    parts.append(_usage_table(r))
    parts.extend(_api_tables(r))
    if len(r.groups) > 1 and len(r.total.apis) <= 4:
        parts.append(_group_matrix(r))
    if r.total.unmeasured_models:
        names = ", ".join(r.total.unmeasured_models)
        parts.append(
            Text(
                f"Not costed (no measured throughput): tokens of {names}. Run "
                "`freehold bench MODEL` on this machine to cost them.",
                style="yellow",
            )
        )
    parts.append(
        Text(
            "Savings are % of the API price for the same input and output tokens (negative: "
            "dearer here). Cached prompt tokens are priced as ordinary input on both sides. "
            f"Prices: {r.price_sheet}, dated per row.",
            style="dim",
        )
    )
    return Group(*parts)


def _usage_table(r: SavingsReport) -> Table:
    t = Table(title="Tokens served and their cost here", title_justify="left")
    t.add_column(r.by)
    for col in ("requests", "failed", "input tok", "cached", "output tok", "here $"):
        t.add_column(col, justify="right")
    for g in [*r.groups, r.total]:
        t.add_row(
            g.group,
            str(g.requests),
            str(g.failed),
            f"{g.prompt_tokens:,}",
            f"{g.cached_tokens:,}",
            f"{g.completion_tokens:,}",
            _here(g),
            style="bold" if g is r.total else None,
            end_section=g is r.groups[-1] if r.groups else False,
        )
    return t


def _here(g: GroupSavings) -> str:
    """The cost here, flagged when some of the group's models have no measured throughput."""
    if not g.unmeasured_models:
        return _usd(g.here_usd)
    if g.costed_prompt_tokens + g.costed_completion_tokens == 0:
        return "not costed"
    return f"{_usd(g.here_usd)} (part)"


def _api_tables(r: SavingsReport) -> list[Table]:
    """The total's comparators, one table per kind as in `cost`, dearest API first."""
    t = r.total
    here = _usd(t.here_usd)
    tokens = f"{t.costed_prompt_tokens:,} in / {t.costed_completion_tokens:,} out"
    out = []
    for kind, heading in _KINDS:
        apis = sorted((a for a in t.apis if a.kind == kind), key=lambda a: -a.usd)
        if not apis:
            continue
        table = Table(
            title=f"{heading}: the same {tokens} tokens, vs {here} here",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        table.add_column("comparator (price date)", overflow="fold", ratio=1)
        for col in ("API $/1M in/out", "API $", "saving"):
            table.add_column(col, justify="right")
        for a in apis:
            table.add_row(
                f"{a.comparator} ({_short_date(a.as_of)})",
                f"{_num(a.input_per_mtok)}/{_num(a.output_per_mtok)}",
                _usd(a.usd),
                _pct(a.savings_pct),
            )
        out.append(table)
    return out


_KINDS = (
    ("frontier closed", "Frontier closed APIs"),
    ("open-weight", "Hosted open-weight APIs"),
    ("unknown", "Other APIs"),
)


def _origins(text: str) -> str:
    """'decode measured by X at T; prefill measured by X at T' -> 'measured by X at T'."""
    parts = [part.split(" ", 1)[-1] for part in text.split("; ")]
    return "; ".join(dict.fromkeys(parts))


def _group_matrix(r: SavingsReport) -> Table:
    t = Table(title=f"Per {r.by}: API $ (saving)", title_justify="left")
    t.add_column(r.by)
    t.add_column("here $", justify="right")
    for a in r.total.apis:
        t.add_column(a.comparator, justify="right", overflow="fold")
    for g in r.groups:
        cells = [f"{_usd(a.usd)} ({_pct(a.savings_pct)})" for a in g.apis]
        t.add_row(g.group, _here(g), *cells)
    return t
