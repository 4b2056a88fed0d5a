"""Keep: a vault of verified, catalogued open weights with their license terms."""

from __future__ import annotations

from pathlib import Path

from freehold.vault.catalog import ModelRecord, parse_ref
from freehold.vault.store import Vault

__all__ = ["ModelRecord", "Vault", "parse_ref", "resolve_model_path"]


def resolve_model_path(ref: str, home: Path | None = None) -> Path:
    """A vault name (`name[:tag]`, alias) or an existing `.gguf` path → the file to load."""
    p = Path(ref).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return p
    with Vault(home) as vault:
        return vault.resolve_model_path(ref)
