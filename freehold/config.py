"""Where Freehold keeps its state, and the settings that shape it."""

from __future__ import annotations

import json
import os
import re
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
    """The layout of one Freehold home: decided once (`paths()`) and passed down, never re-read.

    The CLI's root callback makes the one value each command uses; the server keeps it in
    `ServerSettings.home`; library functions take it as their `home` parameter.
    """

    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def tmp(self) -> Path:
        # Temp files live beside the blobs so the final rename never crosses filesystems.
        return self.root / "tmp"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.db"

    @property
    def licenses(self) -> Path:
        return self.root / "licenses"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.db"

    @property
    def keys(self) -> Path:
        return self.root / "keys.db"

    @property
    def responses(self) -> Path:
        # Responses API results kept with `serve --store-responses` (prompts inside: 0600).
        return self.root / "responses.db"

    @property
    def batches(self) -> Path:
        # Batch API state: uploaded files, batches and each line's result (prompts inside: 0600).
        return self.root / "batches.db"

    @property
    def batch_files(self) -> Path:
        # The contents of the Batch API's files (inputs, outputs, errors), one file each.
        return self.root / "files"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def measurements(self) -> Path:
        # Throughput measured by `freehold bench`, read by `freehold cost`; one JSON record a line.
        return self.root / "measurements.jsonl"

    def ensure(self) -> Paths:
        for d in (self.root, self.blobs, self.tmp, self.licenses):
            d.mkdir(parents=True, exist_ok=True)
        return self


def paths(root: Path | None = None) -> Paths:
    """The home at `root`, else the one the environment names (see `default_home`)."""
    return Paths(root or default_home())


def read_settings(home: Paths) -> dict[str, Any]:
    """settings.json as a dict (empty when absent); a damaged file is a clear error."""
    if not home.settings.exists():
        return {}
    try:
        data = json.loads(home.settings.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidInput(
            f"settings file {home.settings} is not valid JSON ({e}): fix it"
        ) from None
    return data if isinstance(data, dict) else {}


def parse_size(text: str) -> int:
    """'512M', '1.5G', '300MiB', '2GB' → bytes (binary units, as memory is sold)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise InvalidInput(f"'{text}' is not a size: write e.g. 512M or 1.5G")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m[2].upper()]
    return int(float(m[1]) * scale)
