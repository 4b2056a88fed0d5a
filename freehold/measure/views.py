"""Rich renderings of measure results for the terminal. Pure presentation: no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from freehold.measure.cost import LocalCost
from freehold.measure.costing import CostReport, Row
from freehold.measure.eval import EvalResult
from freehold.measure.metrics import Summary
from freehold.measure.report import fmt


def bench_tables(title: str, levels: Sequence[Summary]) -> Group:
    summary = Table(title=title, title_justify="left")
    summary.add_column("load", no_wrap=True)
    for col in ("done", "failed", "secs", "req/s", "out tok/s", "all tok/s", "goodput req/s"):
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
    errors = [s for s in levels if s.first_error]
    for s in errors:
        parts.append(
            Text(f"{s.label}: {s.failed} failed, first error: {s.first_error}", style="yellow")
        )
    return Group(*parts)


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
