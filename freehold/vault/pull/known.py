"""What the vault already knows about a file before any byte of it is fetched.

A hub publishes the weights' sha256 up front, and the vault names blobs by it: a pull under
a name that already holds those weights is a no-op, one under a name holding other weights
is refused before the download, and weights stored under any other name are not fetched.
"""

from __future__ import annotations

from pathlib import Path

from freehold.errors import InvalidInput
from freehold.vault.catalog import parse_ref
from freehold.vault.store import AddResult, Vault


def held_under(vault: Vault, name: str | None, digest: str | None) -> AddResult | None:
    """The existing model when `name` already holds `digest`; refuses other weights."""
    if not name or not digest:
        return None
    n, t = parse_ref(name)
    existing = vault.catalog.find(f"{n}:{t}")
    if existing is None:
        return None
    if existing.digest != digest:
        raise InvalidInput(
            f"'{existing.ref}' already names other weights ({existing.digest[:19]}…): choose "
            "another --name, or `freehold rm` it first"
        )
    return AddResult(existing, False, False)


def stored_copy(vault: Vault, digest: str | None) -> Path | None:
    """The vault's own blob with these bytes, if it has one (linked in, not downloaded)."""
    if digest and digest.startswith("sha256:") and vault.blobs.exists(digest):
        return vault.blobs.path(digest)
    return None
