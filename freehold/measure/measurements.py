"""Throughput measured on this machine, kept for `freehold cost`.

`freehold bench MODEL` (the engine) and `freehold bench --url` (a server) call
`record_throughput`; `freehold cost` reads the newest record with `latest_throughput`.
Records are appended one JSON object a line, so concurrent writers never corrupt each other.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from freehold.config import Paths


@dataclass(frozen=True)
class Throughput:
    """Prefill and decode rates for one model on this machine, and how they were measured."""

    model: str
    prefill_tps: float | None
    decode_tps: float
    source: str
    measured_at: str
    detail: dict[str, Any] = field(default_factory=dict)


def record_throughput(
    model: str,
    decode_tps: float,
    prefill_tps: float | None,
    source: str,
    detail: dict[str, Any] | None = None,
    *,
    home: Paths,
) -> Throughput:
    rec = Throughput(
        model=model,
        prefill_tps=prefill_tps,
        decode_tps=decode_tps,
        source=source,
        measured_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        detail=detail or {},
    )
    home.measurements.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(rec), sort_keys=True) + "\n").encode()
    # One write() on an O_APPEND descriptor: lines from concurrent writers never interleave.
    fd = os.open(home.measurements, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return rec


def all_throughput(home: Paths) -> list[Throughput]:
    if not home.measurements.exists():
        return []
    out = []
    for line in home.measurements.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
            out.append(Throughput(**d))
        except (json.JSONDecodeError, TypeError):
            continue  # a torn or foreign line: skip it rather than lose every record
    return out


def latest_throughput(home: Paths, model: str | None = None) -> Throughput | None:
    """The newest record, for `model` when given (exact name, then file stem)."""
    records = all_throughput(home)
    if model is not None:
        records = [r for r in records if r.model == model or _stem(r.model) == _stem(model)]
    return records[-1] if records else None


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base[:-5] if base.endswith(".gguf") else base
