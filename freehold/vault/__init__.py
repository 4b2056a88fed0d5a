"""Keep: a vault of verified, catalogued open weights with their license terms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from freehold.config import Paths
from freehold.errors import InvalidInput, NotFound
from freehold.vault.catalog import ModelRecord, parse_ref
from freehold.vault.store import Vault

__all__ = [
    "ModelRecord",
    "ModelSpec",
    "Vault",
    "parse_ref",
    "resolve_model_path",
    "resolve_model_spec",
]


def resolve_model_path(ref: str, home: Paths | None = None) -> Path:
    """A vault name (`name[:tag]`, alias) or an existing `.gguf` path → the file to load."""
    p = Path(ref).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return p
    with Vault(home) as vault:
        return vault.resolve_model_path(ref)


@dataclass(frozen=True)
class ModelSpec:
    """What to load for a model reference: base weights plus any LoRA adapters on top."""

    ref: str
    path: Path
    adapters: tuple[Path, ...] = ()


def resolve_model_spec(ref: str, home: Paths | None = None) -> ModelSpec:
    """`BASE`, `BASE+ADAPTER[+ADAPTER]`, or an adapter's name alone (served on its own base).

    Each part may be a vault name or a `.gguf` path.
    """
    parts = [p.strip() for p in ref.split("+")]
    if not all(parts):
        raise InvalidInput(f"'{ref}' is not a model reference: use BASE or BASE+ADAPTER")
    if all(
        Path(p).expanduser().suffix == ".gguf" and Path(p).expanduser().is_file() for p in parts
    ):
        paths = [Path(p).expanduser() for p in parts]
        return ModelSpec(ref, paths[0], tuple(paths[1:]))
    with Vault(home) as vault:
        return _spec_from_vault(vault, ref, parts)


def _spec_from_vault(vault: Vault, ref: str, parts: list[str]) -> ModelSpec:
    def path_of(part: str) -> tuple[Path, ModelRecord | None]:
        p = Path(part).expanduser()
        if p.suffix == ".gguf" and p.is_file():
            return p, None
        return vault.resolve_model_path(part), vault.get(part)

    base_path, base = path_of(parts[0])
    if base is not None and base.kind == "adapter":
        if len(parts) > 1:
            raise InvalidInput(f"'{parts[0]}' is an adapter: write BASE+ADAPTER")
        parent = next((m for m in vault.list() if m.digest == base.parent_digest), None)
        if parent is None:
            raise NotFound(
                f"the base model of adapter '{base.ref}' is not in the vault: "
                "name one with BASE+ADAPTER"
            )
        return ModelSpec(ref, vault.blob_path(parent), (base_path,))
    adapters = []
    for part in parts[1:]:
        path, record = path_of(part)
        if record is not None and record.kind != "adapter":
            raise InvalidInput(f"'{part}' is a model, not an adapter: write BASE+ADAPTER")
        adapters.append(path)
    return ModelSpec(ref, base_path, tuple(adapters))
