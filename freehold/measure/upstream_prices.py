"""What an upstream model's tokens cost: the price-sheet row its `--upstream …,price=ROW` named.

`freehold serve` records model -> row in the home (`upstream_prices.json`) when it starts, so
that `freehold savings`, which reads only the ledger, later prices those tokens at the
upstream's own list price instead of this machine's hardware cost (the upstream's tokens were
not computed here). Earlier servers' entries are kept: old ledger rows still name them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from freehold.atomic import atomic_write
from freehold.config import Paths
from freehold.errors import InvalidInput
from freehold.measure.prices import Price, load_prices

FILE = "upstream_prices.json"


def _path(home: Paths) -> Path:
    return home.root / FILE


def load(home: Paths) -> dict[str, str]:
    """Served model id -> the price row named for it; {} when none was ever named."""
    path = _path(home)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(
            f"{path} is not readable JSON ({e}); delete it and restart serve"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InvalidInput(f"{path} must map model ids to price rows; delete it and restart serve")
    return data


def record(home: Paths, prices: Iterable[tuple[str, str]]) -> list[str]:
    """Remember (model, price row) pairs; an id named again takes its new row.

    A row missing from the bundled sheet is kept (a user's own sheet may have it, given to
    `freehold savings --prices FILE`); the rows missing are returned for a warning."""
    new = dict(prices)
    if not new:
        return []
    merged = {**load(home), **new}
    with atomic_write(_path(home)) as f:
        f.write(json.dumps(merged, indent=2, sort_keys=True).encode())
    bundled = load_prices()
    return sorted({row for row in new.values() if find(bundled, row) is None})


def _key(name: str) -> str:
    return " ".join(name.replace("/", " ").lower().split())


def find(sheet: Iterable[Price], row: str) -> Price | None:
    """The sheet's row called `row` ("provider model", or "provider/model"; any case)."""
    want = _key(row)
    return next((p for p in sheet if _key(p.name) == want), None)
