"""Where Freehold keeps its state, and the settings that shape it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freehold.errors import InvalidInput


def default_home() -> Path:
    """`$FREEHOLD_HOME`, else `$XDG_DATA_HOME/freehold`, else `~/.local/share/freehold`."""
    env = os.environ.get("FREEHOLD_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "freehold"


@dataclass(frozen=True)
class Paths:
    """The layout of one Freehold home directory."""

    home: Path

    @property
    def blobs(self) -> Path:
        return self.home / "blobs"

    @property
    def tmp(self) -> Path:
        # Temp files live beside the blobs so the final rename never crosses filesystems.
        return self.home / "tmp"

    @property
    def catalog(self) -> Path:
        return self.home / "catalog.db"

    @property
    def licenses(self) -> Path:
        return self.home / "licenses"

    @property
    def ledger(self) -> Path:
        return self.home / "ledger.db"

    @property
    def keys(self) -> Path:
        return self.home / "keys.db"

    @property
    def responses(self) -> Path:
        # Responses API results kept with `serve --store-responses` (prompts inside: 0600).
        return self.home / "responses.db"

    @property
    def audit_log(self) -> Path:
        return self.home / "audit.jsonl"

    @property
    def settings(self) -> Path:
        return self.home / "settings.json"

    @property
    def measurements(self) -> Path:
        # Throughput measured by `freehold bench`, read by `freehold cost`; one JSON record a line.
        return self.home / "measurements.jsonl"

    def ensure(self) -> Paths:
        for d in (self.home, self.blobs, self.tmp, self.licenses):
            d.mkdir(parents=True, exist_ok=True)
        return self


def paths(home: Path | None = None) -> Paths:
    return Paths(home or default_home())


def read_settings(p: Paths) -> dict[str, Any]:
    """settings.json as a dict (empty when absent); a damaged file is a clear error."""
    if not p.settings.exists():
        return {}
    try:
        data = json.loads(p.settings.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidInput(f"settings file {p.settings} is not valid JSON ({e}): fix it") from None
    return data if isinstance(data, dict) else {}
