"""What the adapt verbs print: plain data that the CLI shows as rows or JSON."""

from __future__ import annotations

from typing import Any

from freehold.adapt.quantize import QuantizeReport
from freehold.adapt.tune import TuneReport


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def quantize_summary(report: QuantizeReport) -> dict[str, Any]:
    r, src, plan = report.record, report.source, report.result.plan
    lines: list[tuple[str, str]] = [
        ("Stored", f"{r.ref} ({r.digest[:19]}…)"),
        ("From", f"{src.ref} {src.quantization}, {_mib(src.size)}"),
        ("Type", f"{plan.qtype}: {_mib(r.size)}, {r.bits_per_weight} bits per weight"),
    ]
    if report.result.source_quantization not in ("F32", "F16", "BF16"):
        lines.append(("Note", "requantized from an already quantized file: expect extra loss"))
    if report.fit:
        lines.append(("Fit", report.fit.explain()))
    if plan.fallbacks:
        used = sorted({f"{f.wanted}→{f.used}" for f in plan.fallbacks})
        lines.append(
            (
                "Fallbacks",
                f"{len(plan.fallbacks)} tensors ({', '.join(used)}): row lengths such as "
                f"{plan.fallbacks[0].columns} are not divisible by 256",
            )
        )
    q = report.quality
    if q is not None:
        lines.append(
            (
                "Quality",
                f"mean KL {q.mean_kl:.5f}, p99 KL {q.kl_p99:.4f}, top-1 agreement "
                f"{100 * (q.top1_agreement or 0):.1f}% vs {src.ref} over {q.tokens_scored} "
                f"tokens; perplexity {q.perplexity:.3f} (source {q.reference_perplexity:.3f})",
            )
        )
    return {
        "model": r.ref,
        "digest": r.digest,
        "parent": src.ref,
        "parent_digest": r.parent_digest,
        "type": plan.qtype,
        "size_bytes": r.size,
        "bits_per_weight": r.bits_per_weight,
        "fallbacks": [f.__dict__ for f in plan.fallbacks],
        "fit": None if report.fit is None else report.fit.explain(),
        "quality": None if q is None else q.to_json(),
        "lines": lines,
    }


def tune_lines(report: TuneReport) -> list[tuple[str, str]]:
    res = report.result
    lines = [
        ("Adapter", f"{report.adapter.ref} ({report.adapter.digest[:19]}…) on {report.base.ref}"),
        ("Run it", f'freehold run {report.base.ref}+{report.adapter.ref} "…"'),
        (
            "Validation loss",
            f"{res.val_loss_before:.4f} before → {res.val_loss_after:.4f} after",
        ),
        (
            "Training",
            f"{res.steps} steps, {res.train_tokens} tokens in {res.seconds:.0f} s "
            f"({res.tokens_per_s:.0f} tok/s), peak memory {_mib(res.peak_rss_bytes)}",
        ),
        ("KL from base", f"{report.kl_from_base:.4f} nats/token on the bundled corpus"),
    ]
    if report.merged:
        lines.append(("Merged", report.merged))
    for i, ex in enumerate(report.examples, 1):
        lines += [
            (f"Held-out {i}", ex["prompt"]),
            ("  base", ex["base"]),
            ("  tuned", ex["tuned"]),
        ]
    return lines
