"""API price sheets: the bundled dated CSV, a user's CSV in the same shape, or LiteLLM's JSON.

CSV columns: provider, model, open_weights(yes/no), input_usd_per_mtok, output_usd_per_mtok,
as_of, source_url. LiteLLM's `model_prices_and_context_window.json` stores USD per token
(`input_cost_per_token`, `output_cost_per_token`) and has no dates, so rows from it carry the
file's modification date and say so.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from freehold.errors import InvalidInput, NotFound

CSV_COLUMNS = (
    "provider",
    "model",
    "open_weights(yes/no)",
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "as_of",
    "source_url",
)


@dataclass(frozen=True)
class Price:
    """One API's list price per million tokens, with when and where it was read."""

    provider: str
    model: str
    open_weights: bool | None
    input_per_mtok: float
    output_per_mtok: float
    as_of: str
    source: str

    @property
    def name(self) -> str:
        return f"{self.provider} {self.model}"

    @property
    def kind(self) -> str:
        return {True: "open-weight", False: "frontier closed", None: "unknown"}[self.open_weights]


def bundled_sheet() -> Path:
    return Path(str(files("freehold.measure").joinpath("data", "prices.csv")))


def load_prices(path: Path | None = None) -> list[Price]:
    """The bundled sheet, or the user's CSV / LiteLLM JSON at `path`."""
    path = path or bundled_sheet()
    if not path.is_file():
        raise NotFound(f"price sheet {path} not found: give a CSV or LiteLLM JSON file")
    if path.suffix.lower() == ".json":
        return _load_litellm(path)
    return _load_csv(path)


def filter_prices(prices: list[Price], only: list[str] | None) -> list[Price]:
    """Rows whose provider or model contains any of `only` (case-insensitive)."""
    if not only:
        return prices
    needles = [o.lower() for o in only]
    return [p for p in prices if any(n in p.name.lower() for n in needles)]


def _number(value: str, what: str, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{where}: {what} {value!r} is not a number") from None
    if x < 0:
        raise InvalidInput(f"{where}: {what} {value!r} is negative")
    return x


def _open_weights(value: str, where: str) -> bool | None:
    v = (value or "").strip().lower()
    if v in ("yes", "y", "true", "1"):
        return True
    if v in ("no", "n", "false", "0"):
        return False
    if v in ("", "unknown"):
        return None
    raise InvalidInput(f"{where}: open_weights must be yes or no, got {value!r}")


def _load_csv(path: Path) -> list[Price]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InvalidInput(
                f"price sheet {path} lacks columns {', '.join(missing)}: "
                f"use the header {','.join(CSV_COLUMNS)}"
            )
        rows = []
        for n, row in enumerate(reader, start=2):
            where = f"{path.name} line {n}"
            rows.append(
                Price(
                    provider=row["provider"].strip(),
                    model=row["model"].strip(),
                    open_weights=_open_weights(row["open_weights(yes/no)"], where),
                    input_per_mtok=_number(row["input_usd_per_mtok"], "input price", where),
                    output_per_mtok=_number(row["output_usd_per_mtok"], "output price", where),
                    as_of=row["as_of"].strip() or "undated",
                    source=row["source_url"].strip(),
                )
            )
    if not rows:
        raise InvalidInput(f"price sheet {path} has no rows")
    return rows


def _load_litellm(path: Path) -> list[Price]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidInput(f"price sheet {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"price sheet {path}: expected LiteLLM's object of models")
    as_of = dt.date.fromtimestamp(path.stat().st_mtime).isoformat() + " (file date)"
    rows = []
    for model, spec in data.items():
        if model == "sample_spec" or not isinstance(spec, dict):
            continue
        cin, cout = spec.get("input_cost_per_token"), spec.get("output_cost_per_token")
        if not isinstance(cin, int | float) or not isinstance(cout, int | float):
            continue
        if cin <= 0 and cout <= 0:
            continue
        rows.append(
            Price(
                provider=str(spec.get("litellm_provider", "")) or "unknown",
                model=model,
                open_weights=None,
                input_per_mtok=float(cin) * 1e6,
                output_per_mtok=float(cout) * 1e6,
                as_of=as_of,
                source=f"LiteLLM price file {path.name}",
            )
        )
    if not rows:
        raise InvalidInput(f"price sheet {path} has no models with per-token prices")
    return rows
