"""What Ollama's model routes say about a served model: names, GGUF facts, digest, license.

Facts come from the weights file the server loads (its GGUF header, read without loading the
model) and, when that file is a vault blob, from the vault's record of it (import time, the
license text kept with it). A served `.gguf` path outside the vault has no record: its license is
the GGUF's own `general.license`, and its digest is hashed once and remembered.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.ollama.protocol import Details
from freehold.server.services import Services
from freehold.vault import ModelRecord, Vault
from freehold.vault.gguf_meta import GGUFInfo, read_header, read_info

LATEST = ":latest"
_BLOB = re.compile(r"^sha256-([0-9a-f]{64})$")
_LICENSE_ROLES = ("license", "notice")
# Go's longest duration, which Ollama uses for "never expires" (keep_alive < 0).
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


# -- names -------------------------------------------------------------------------------------


def ollama_name(served_id: str) -> str:
    """Ollama's names always carry a tag: `smollm2` is listed as `smollm2:latest`."""
    return served_id if ":" in served_id else served_id + LATEST


def served_id(s: Services, name: str) -> str:
    """The served model a client's name stands for, with or without Ollama's `:latest` tag.

    An unknown name comes back unchanged, so that admission refuses it (404) and accounts for
    the refusal like any other."""
    candidates = [name]
    if name.endswith(LATEST):
        candidates.append(name.removesuffix(LATEST))
    elif ":" not in name:
        candidates.append(name + LATEST)
    for candidate in candidates:
        try:
            return s.registry.resolve(candidate)
        except APIError:
            continue
    return name


def visible_id(s: Services, name: str, key: ApiKey | None) -> str:
    """The served id for a model route (show): 404 when unknown or not allowed to this key,
    as /v1/models/{id} does, so a key learns nothing about models it may not use."""
    mid = served_id(s, name)
    if not s.registry.known(mid) or (key is not None and not key.allows(mid)):
        raise APIError(404, f"model {name!r} not found", param="model", code="model_not_found")
    return mid


# -- the weights file --------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileFacts:
    meta: dict[str, Any]
    info: GGUFInfo
    digest: str  # sha256 hex


_cache: dict[tuple[str, int, int], _FileFacts] = {}
_cache_lock = threading.Lock()


def _file_facts(path: Path) -> _FileFacts:
    """The GGUF header and digest of a weights file, computed once per file version."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    meta, _ = read_header(path)
    blob = _BLOB.match(path.name)
    digest = blob.group(1) if blob else _sha256(path)
    facts = _FileFacts(meta, read_info(path), digest)
    with _cache_lock:
        _cache[key] = facts
    return facts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _vault_facts(
    s: Services, path: Path, digest: str, mid: str
) -> tuple[ModelRecord | None, list[str]]:
    """The vault's record of these weights and the license texts kept with them, when the file
    is one of this home's blobs."""
    if path.parent != s.settings.home.blobs or not _BLOB.match(path.name):
        return None, []
    with Vault(s.settings.home) as vault:
        same = [r for r in vault.list() if r.digest == f"sha256:{digest}"]
        named = [r for r in same if mid in (r.ref, r.name, r.ref.removesuffix(LATEST))]
        record = (named or same or [None])[0]
        if record is None:
            return None, []
        texts = [
            vault.blobs.path(f.digest).read_text("utf-8", errors="replace").strip()
            for role in _LICENSE_ROLES
            for f in record.files
            if f.role == role
        ]
        return record, texts


# -- a served model ----------------------------------------------------------------------------


@dataclass
class ModelFacts:
    """Everything the model routes report about one served model (blocking to build: files)."""

    id: str
    path: Path
    file: _FileFacts
    record: ModelRecord | None
    license: str
    modified_at: str

    @property
    def name(self) -> str:
        return ollama_name(self.id)

    @property
    def meta(self) -> dict[str, Any]:
        return self.file.meta

    @property
    def info(self) -> GGUFInfo:
        return self.file.info

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def digest(self) -> str:
        return self.file.digest

    @cached_property
    def details(self) -> Details:
        arch = self.info.architecture
        return Details(
            family=arch,
            families=[arch],
            parameter_size=human_number(self.info.parameters),
            quantization_level=self.info.quantization,
        )

    def model_info(self, context_length: int) -> dict[str, Any]:
        """GGUF key/values as Ollama's `model_info` (vocabularies and the template left out).

        `<arch>.context_length` is the context a request gets on this server, since clients
        (VS Code Copilot, Continue) size their prompts from it."""
        out = {
            k: v
            for k, v in self.meta.items()
            if isinstance(v, str | int | float | bool | list) and not k.startswith("tokenizer.")
        }
        out["tokenizer.ggml.model"] = self.meta.get("tokenizer.ggml.model")
        out["general.architecture"] = self.info.architecture
        out["general.parameter_count"] = self.info.parameters
        out[f"{self.info.architecture}.context_length"] = context_length
        return {k: v for k, v in out.items() if v is not None}


def model_facts(s: Services, mid: str) -> ModelFacts:
    if s.registry.is_external(mid):  # --upstream: its weights are on another server
        raise APIError(
            501,
            f"{mid} is served by an upstream server: its weights file, template and details are "
            "there, not here; ask that server",
            code="not_supported_for_upstream",
        )
    path = s.registry.pool.spec(mid).path
    file = _file_facts(path)
    record, texts = _vault_facts(s, path, file.digest, mid)
    if record is not None:
        modified = rfc3339(datetime.fromisoformat(record.imported_at))
    else:
        modified = rfc3339(datetime.fromtimestamp(path.stat().st_mtime, UTC))
    # The license text kept with the weights; else what the GGUF itself declares.
    license_text = "\n\n".join(texts) or file.info.license_name or file.info.license or ""
    return ModelFacts(mid, path, file, record, license_text, modified)


def human_number(n: int) -> str:
    """A parameter count as Ollama shows it: 134515008 -> "134.52M", 8030261248 -> "8.0B"."""
    for scale, unit, places in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if n >= scale:
            x = n / scale
            return f"{x:.0f}{unit}" if x == int(x) else f"{x:.{places}f}{unit}"
    return str(n)
