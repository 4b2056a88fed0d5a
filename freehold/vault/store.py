"""The vault: blobs plus catalog, kept consistent.

Every import stages its bytes (hashed while copied, fsynced), checks them, then commits
the blobs and the catalog rows; a failure anywhere before the catalog commit discards
the staged files, so the vault is unchanged. A crash after the blob rename but before the
catalog commit leaves only an unreferenced blob, which `gc` removes and nothing shows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freehold.config import Paths, paths
from freehold.errors import IntegrityError, InvalidInput, NotFound
from freehold.vault import licenses
from freehold.vault.blobs import BlobStore, StagedBlob, staged_cleanup
from freehold.vault.catalog import Catalog, ModelFile, ModelRecord, parse_ref
from freehold.vault.gguf_meta import GGUFInfo, check_magic, read_info
from freehold.vault.importers import ImportPlan, SourceFile
from freehold.vault.licenses import LicenseProfile

# progress(description, total_bytes) -> advance(n_bytes)
ProgressFactory = Callable[[str, int], Callable[[int], None]]
LICENSE_TEXT_MAX = 2 << 20


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _no_progress(_description: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def default_ref(filename: str, info: GGUFInfo) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' → 'smollm2-135m-instruct:q4_1'."""
    stem = filename.removesuffix(".gguf")
    quant = info.quantization.lower()
    stem = re.sub(rf"[.\-_]{re.escape(quant)}$", "", stem, flags=re.I)
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    return f"{name}:{quant}"


@dataclass
class Provenance:
    source_kind: str  # file | pkg | ollama | hf | bundle | derived
    source_location: str
    original_filename: str | None = None
    upstream_revision: str | None = None
    parent_digest: str | None = None
    derivation: dict[str, Any] | None = None


def new_record(
    info: GGUFInfo, blob: StagedBlob, name: str, tag: str, origin: Provenance, license_id: str
) -> ModelRecord:
    """A catalog entry whose facts come from the bytes themselves, never from a claim."""
    return ModelRecord(
        name=name,
        tag=tag,
        digest=blob.digest,
        size=blob.size,
        format="gguf",
        kind="adapter" if info.file_type == "adapter" else "model",
        architecture=info.architecture,
        parameters=info.parameters,
        quantization=info.quantization,
        bits_per_weight=info.bits_per_weight,
        context_length=info.context_length,
        layers=info.layers,
        embedding_length=info.embedding_length,
        vocab_size=info.vocab_size,
        has_chat_template=info.has_chat_template,
        metadata=info.to_dict(),
        source_kind=origin.source_kind,
        source_location=origin.source_location,
        original_filename=origin.original_filename,
        upstream_revision=origin.upstream_revision,
        imported_at=_now(),
        parent_digest=origin.parent_digest,
        derivation=origin.derivation,
        license_id=license_id,
    )


@dataclass
class AddResult:
    record: ModelRecord
    new_model: bool  # False when this name already held exactly these weights
    new_blob: bool  # False when the weights were already stored (under any name)


@dataclass
class Problem:
    model: str
    digest: str
    status: str  # missing | corrupt
    what: str  # weights | license file name


class Vault:
    def __init__(self, home: Paths | None = None) -> None:
        """The vault in `home`; a library caller that has none gets the environment's."""
        self.home: Paths = (home or paths()).ensure()
        self.blobs = BlobStore(self.home.blobs, self.home.tmp)
        self.catalog = Catalog(self.home.catalog)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def list(self) -> list[ModelRecord]:
        return self.catalog.all()

    def get(self, ref: str) -> ModelRecord:
        return self.catalog.get(ref)

    def license(self, record: ModelRecord) -> LicenseProfile:
        return licenses.by_id(record.license_id)

    def blob_path(self, record: ModelRecord) -> Path:
        return self.blobs.path(record.digest)

    def resolve_model_path(self, ref: str) -> Path:
        """A vault name (or alias) or an existing .gguf path → the file to load."""
        p = Path(ref).expanduser()
        if p.suffix == ".gguf" and p.is_file():
            return p
        record = self.get(ref)
        if record.format != "gguf":
            raise InvalidInput(self._not_loadable(record))
        path = self.blob_path(record)
        if not path.is_file():
            raise NotFound(
                f"the weights of '{ref}' are missing from the vault: run `freehold verify`"
            )
        return path

    def _not_loadable(self, record: ModelRecord) -> str:
        """What to load instead of a kept original (a safetensors folder): its GGUFs."""
        children = [r.ref for r in self.list() if r.parent_digest == record.digest]
        instead = (
            f"use its GGUF: {', '.join(children)}"
            if children
            else "convert it with `freehold add DIR` and use the GGUF"
        )
        kept = f"'{record.ref}' is the original {record.format} copy"
        return f"{kept}, which llama.cpp cannot load: {instead}"

    # -- adding ----------------------------------------------------------------------------

    def add(
        self,
        plan: ImportPlan,
        ref: str | None = None,
        link: bool = False,
        progress: ProgressFactory | None = None,
        aliases: tuple[str, ...] = (),
    ) -> AddResult:
        progress = progress or _no_progress
        if ref:
            parse_ref(ref)  # reject a bad name before copying gigabytes
        label = plan.source_location
        check_magic(plan.weights.parts[0], label)
        staged: list[StagedBlob] = []
        with staged_cleanup(self.blobs, staged):
            weights = self._stage_weights(plan.weights, link, progress)
            staged.append(weights)
            info = read_info(weights.tmp_path, label)
            extras = [(f, self._stage_small(f)) for f in plan.extras]
            staged.extend(s for _, s in extras)
            name, tag = parse_ref(
                ref or plan.suggested_ref or default_ref(plan.weights.filename, info)
            )
            existing = self.catalog.find(f"{name}:{tag}")
            if existing is not None:
                return self._existing(existing, weights, staged)
            profile = self._license(plan, info, [f for f, _ in extras])
            origin = Provenance(
                plan.source_kind,
                plan.source_location,
                plan.weights.filename,
                plan.upstream_revision,
            )
            record = new_record(info, weights, name, tag, origin, profile.id)
            record.files = [ModelFile(f.role, f.filename, s.digest, s.size) for f, s in extras]
            record.aliases = list(aliases)
            new_blob = not self.blobs.exists(weights.digest)
            for s in staged:
                self.blobs.commit(s)
            with self.catalog.transaction():
                record.id = self.catalog.insert(record)
        return AddResult(self.catalog.get(record.ref), True, new_blob)

    def _existing(
        self, existing: ModelRecord, weights: StagedBlob, staged: list[StagedBlob]
    ) -> AddResult:
        for s in staged:
            self.blobs.discard(s)
        if existing.digest != weights.digest:
            raise InvalidInput(
                f"'{existing.ref}' already names other weights ({existing.digest[:19]}…): choose "
                "another --name, or `freehold rm` it first"
            )
        return AddResult(existing, False, False)

    def _stage_weights(
        self, source: SourceFile, link: bool, progress: ProgressFactory
    ) -> StagedBlob:
        total = source.size
        advance = progress(f"Storing {source.filename}", total)
        if link:
            if len(source.parts) != 1:
                raise InvalidInput("--link needs a single file; this source is split into chunks")
            known = source.expected_digest if source.verified else None
            staged = self.blobs.stage_link(source.parts[0], advance, known)
            if source.expected_digest not in (None, staged.digest):
                self.blobs.discard(staged)
                raise IntegrityError(
                    f"{source.filename} hashes to {staged.digest} but its source says "
                    f"{source.expected_digest}; the source is corrupt or was changed"
                )
            return staged
        return self.blobs.stage_files(source.parts, source.expected_digest, advance)

    def _stage_small(self, source: SourceFile) -> StagedBlob:
        return self.blobs.stage_files(source.parts, source.expected_digest)

    def _license(
        self, plan: ImportPlan, info: GGUFInfo, extras: list[SourceFile]
    ) -> LicenseProfile:
        texts = []
        for f in extras:
            if f.role in ("license", "notice") and f.size <= LICENSE_TEXT_MAX:
                texts.append(b"".join(p.read_bytes() for p in f.parts).decode(errors="replace"))
        declared = [info.license, info.license_name]
        if info.license in (None, "other"):
            declared = [info.license_name]
        return licenses.resolve(declared + plan.license_ids, texts)

    def add_derived(
        self,
        path: Path,
        ref: str,
        parent: ModelRecord,
        derivation: dict[str, Any],
        progress: ProgressFactory | None = None,
        link: bool = False,
        filename: str | None = None,
    ) -> ModelRecord:
        """Store a file Freehold made from `parent` (a quantization, an adapter, a merge).

        The parent's license profile and license files carry over: derivatives stay bound
        by the terms of what they were made from.
        """
        name, tag = parse_ref(ref)
        if self.catalog.name_taken(name, tag):
            raise InvalidInput(f"'{name}:{tag}' already names a model: choose another name")
        origin = Provenance(
            "derived", parent.ref, filename or path.name, None, parent.digest, derivation
        )
        staged: list[StagedBlob] = []
        with staged_cleanup(self.blobs, staged):
            advance = (progress or _no_progress)(path.name, path.stat().st_size)
            # link: the file was written inside the vault's temp dir; no need to copy it again
            if link:
                weights = self.blobs.stage_link(path, advance)
            else:
                weights = self.blobs.stage_file(path, progress=advance)
            staged.append(weights)
            info = read_info(weights.tmp_path, str(path))
            record = new_record(info, weights, name, tag, origin, parent.license_id)
            record.files = list(parent.files)
            self.blobs.commit(weights)
            with self.catalog.transaction():
                self.catalog.insert(record)
        return self.catalog.get(record.ref)

    def alias(self, alias: str, target: str) -> ModelRecord:
        record = self.get(target)
        with self.catalog.transaction():
            self.catalog.add_alias(alias, record.id or 0)
        return self.get(target)

    # -- removing, checking ----------------------------------------------------------------

    def remove(self, ref: str) -> tuple[ModelRecord, int]:
        """Remove a model (or only an alias, if `ref` is one); return bytes freed."""
        record = self.get(ref)
        with self.catalog.transaction():
            if self.catalog.is_alias(ref):
                self.catalog.remove_alias(ref)
                return record, 0
            self.catalog.delete(record.id or 0)
        _, freed = self.gc()
        return record, freed

    def gc(self) -> tuple[int, int]:
        """Delete blobs no model references, temp files of dead writes and the downloads of
        pulls nobody is running (a rerun `pull` would have resumed them): (count, bytes)."""
        from freehold.vault.pull.staging import clear_stale

        keep = self.catalog.referenced_digests()
        count = freed = 0
        for digest in self.blobs.digests():
            if digest not in keep:
                freed += self.blobs.remove(digest)
                count += 1
        freed += self.blobs.clear_temp() + clear_stale(self.home)
        return count, freed

    def verify(
        self, ref: str | None = None, progress: ProgressFactory | None = None
    ) -> list[Problem]:
        """Re-hash every blob of the named model (or of all models)."""
        progress = progress or _no_progress
        records = [self.get(ref)] if ref else self.list()
        checked: dict[str, str] = {}
        problems = []
        for r in records:
            items = [(r.digest, "weights", r.size)] + [
                (f.digest, f.filename, f.size) for f in r.files
            ]
            for digest, what, size in items:
                if digest not in checked:
                    checked[digest] = self.blobs.verify(
                        digest, progress(f"Checking {r.ref} {what}", size)
                    )
                if checked[digest] != "ok":
                    problems.append(Problem(r.ref, digest, checked[digest], what))
        return problems
