"""`freehold cost` as a library: profile + throughput + price sheet into one labelled report.

Every input carries its origin (measured, set, detected, assumed) so the terminal, JSON and
HTML outputs can say which numbers were measured and which were assumed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freehold.config import Paths
from freehold.errors import InvalidInput
from freehold.measure import cost_formulas, hardware, measurements, prices
from freehold.measure.hardware import Machine, Profile


@dataclass(frozen=True)
class Labelled:
    """One input to the calculation and where it came from."""

    name: str
    value: float | str
    unit: str
    origin: str


@dataclass(frozen=True)
class Row:
    """One comparator: its price (with date and source) beside the local cost."""

    price: prices.Price
    comparison: cost_formulas.Comparison


@dataclass(frozen=True)
class CostReport:
    machine: Machine
    inputs: list[Labelled]
    prefill_tps: float
    decode_tps: float
    throughput_origin: str
    local: cost_formulas.LocalCost
    rows: list[Row]
    price_sheet: str
    generated_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    @property
    def utilisation(self) -> float:
        return self.local.utilisation

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["local"]["hourly"]["total"] = self.local.hourly.total
        for row, out in zip(self.rows, d["rows"], strict=True):
            out["comparator"] = row.price.name
            out["kind"] = row.price.kind
            out["utilisation"] = self.utilisation
        return d


def _throughput(
    model: str | None,
    prefill_tps: float | None,
    decode_tps: float | None,
    home: Paths,
) -> tuple[float, float, str]:
    rec = None
    if prefill_tps is None or decode_tps is None:
        rec = measurements.latest_throughput(home, model)
    origins = []
    if decode_tps is not None:
        origins.append("decode assumed (--decode-tps)")
    elif rec is not None:
        decode_tps = rec.decode_tps
        origins.append(f"decode measured by {rec.source} at {rec.measured_at}")
    if prefill_tps is not None:
        origins.append("prefill assumed (--prefill-tps)")
    elif rec is not None and rec.prefill_tps:
        prefill_tps = rec.prefill_tps
        origins.append(f"prefill measured by {rec.source} at {rec.measured_at}")
    if decode_tps is None or prefill_tps is None:
        which = "decode" if decode_tps is None else "prefill"
        scope = f" for {model}" if model else ""
        raise InvalidInput(
            f"no {which} throughput measured{scope}: run `freehold bench MODEL` (or "
            "`freehold bench --url URL --model M`) first, or pass --prefill-tps and --decode-tps "
            "(they will be labelled assumed)"
        )
    if prefill_tps <= 0 or decode_tps <= 0:
        raise InvalidInput("--prefill-tps and --decode-tps must be positive")
    return prefill_tps, decode_tps, "; ".join(origins)


def _inputs(profile: Profile, machine: Machine) -> list[Labelled]:
    units = {
        "price_usd": "USD",
        "lifetime_hours": "h",
        "rent_usd_per_hour": "USD/h",
        "utilisation": "",
        "watts_load": "W",
        "watts_idle": "W",
        "usd_per_kwh": "USD/kWh",
        "pue": "",
        "ops_usd_per_hour": "USD/h",
    }
    skip = {"price_usd", "lifetime_hours"} if profile.rented else set()
    out = [
        Labelled("cpu", machine.cpu, "", "detected"),
        Labelled("cores", machine.cores, "", "detected"),
        Labelled("ram", round(machine.ram_gib, 1), "GiB", "detected"),
        Labelled("gpu", ", ".join(machine.gpus) or "none", "", "detected"),
    ]
    power = {"watts_load", "watts_idle", "usd_per_kwh", "pue"}
    for key, value in profile.values.items():
        if key in skip:
            continue
        origin = profile.origin[key]
        if profile.rented and key in power:
            origin = "not used: power is assumed to be in the rent"
        out.append(Labelled(key, value, units[key], origin))
    return out


def build_report(
    *,
    model: str | None = None,
    prefill_tps: float | None = None,
    decode_tps: float | None = None,
    price_file: Path | None = None,
    only: list[str] | None = None,
    home: Paths,
    machine: Machine | None = None,
) -> CostReport:
    profile = hardware.load_profile(home)
    machine = machine or hardware.detect()
    pre, dec, origin = _throughput(model, prefill_tps, decode_tps, home)
    inputs = profile.cost_inputs()
    local = cost_formulas.local_cost(inputs, pre, dec)
    sheet = prices.filter_prices(prices.load_prices(price_file), only)
    if not sheet:
        raise InvalidInput(f"no price rows match --only {' '.join(only or [])}")
    rows = [
        Row(
            pr,
            cost_formulas.compare(inputs, local, pre, dec, pr.input_per_mtok, pr.output_per_mtok),
        )
        for pr in sheet
    ]
    sheet_name = str(price_file) if price_file else "bundled price sheet"
    all_inputs = _inputs(profile, machine) + [
        Labelled("prefill", round(pre, 2), "tok/s", origin_of(origin, "prefill")),
        Labelled("decode", round(dec, 2), "tok/s", origin_of(origin, "decode")),
    ]
    return CostReport(machine, all_inputs, pre, dec, origin, local, rows, sheet_name)


def origin_of(origins: str, which: str) -> str:
    for part in origins.split("; "):
        if part.startswith(which):
            return part[len(which) + 1 :]
    return "unknown"
