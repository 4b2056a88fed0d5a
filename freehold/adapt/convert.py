"""`freehold add DIR`: a Hugging Face safetensors folder into the vault, converted to GGUF.

The folder is kept whole as the authoritative copy (a "safetensors" record, see
`freehold.vault.folders`); llama.cpp's converter runs on exactly the staged bytes and its GGUF
is stored with the folder as its parent; `--to` quantizes that GGUF once more, from 16 bits,
with the folder → GGUF → quantized lineage recorded. Nothing becomes visible unless every
step succeeded: all blobs are staged first and the records go in one catalog transaction.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freehold.adapt import converter as conv
from freehold.adapt.quantizer import check_type, quantize
from freehold.errors import InvalidInput
from freehold.vault import folders, licenses
from freehold.vault.blobs import StagedBlob, staged_cleanup
from freehold.vault.catalog import ModelRecord, parse_ref
from freehold.vault.gguf_meta import read_info
from freehold.vault.store import (
    LICENSE_TEXT_MAX,
    AddResult,
    ProgressFactory,
    Provenance,
    Vault,
    new_record,
)

FOLDER_TAG = "safetensors"


@dataclass(frozen=True)
class Refs:
    """The names one folder import writes: the folder, its GGUF, and the quantized GGUF."""

    folder: str
    converted: str
    quantized: str | None
    stem: str  # the model's own name (folder or repo), as the converter sees its folder


def names_for(stem: str, name: str | None, outtype: str, qtype: str | None) -> Refs:
    """`--name` names the final model; the others share its name with their own tags.

    Without one, the name comes from `stem` (the folder's or the repo's name).
    """
    if name:
        base, _ = parse_ref(name)
    else:
        base = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "model"
    converted = f"{base}:{outtype}" if qtype or not name else name
    quantized = (name or f"{base}:{qtype.lower()}") if qtype else None
    safe_stem = re.sub(r"[^\w.-]+", "-", stem).strip(".") or "model"
    refs = Refs(
        _full(f"{base}:{FOLDER_TAG}"),
        _full(converted),
        _full(quantized) if quantized else None,
        safe_stem,
    )
    if len({refs.folder, refs.converted, refs.quantized} - {None}) < (3 if qtype else 2):
        raise InvalidInput(f"'{name}' would name two models: choose another --name")
    return refs


def _full(ref: str) -> str:
    """'name' → 'name:latest': a bare name could match another tag of the same name."""
    return ":".join(parse_ref(ref))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _no_progress(_description: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def add_hf_folder(
    vault: Vault,
    folder: Path,
    name: str | None = None,
    *,
    outtype: str = "f16",
    to: str | None = None,
    origin: Provenance | None = None,
    progress: ProgressFactory | None = None,
    link: bool = False,
    say: Callable[[str], None] | None = None,
) -> AddResult:
    """Keep a safetensors folder, convert it to GGUF (then to `to`), all with lineage.

    `origin` says where the folder came from (a pull passes the repo and commit); by default
    the local path. Returns the final GGUF's result; an import that already happened returns
    the existing record with `new_model` False.
    """
    progress = progress or _no_progress
    outtype = conv.check_outtype(outtype)
    qtype = check_type(to) if to else None
    plan = folders.scan_folder(folder)
    origin = origin or Provenance("file", str(plan.folder), plan.folder.name)
    # "hf:ORG/REPO" or a path: its last part names the model when --name does not.
    refs = names_for(Path(origin.source_location.split(":", 1)[-1]).name, name, outtype, qtype)
    _refuse_taken_early(vault, refs)
    tool = None
    if vault.catalog.find(refs.converted) is None:  # fetch (once) and check before copying
        conv.check_dependencies()
        tool = conv.ensure_converter(say or _stderr, progress)
    staged: list[StagedBlob] = []
    with staged_cleanup(vault.blobs, staged):
        sf = folders.stage_folder(vault, plan, progress, link)
        staged.extend(sf.staged)
        parent, existing = _folder_record(vault, sf, refs.folder, origin)
        converted = _existing_child(vault, refs.converted, parent)
        quantized = _existing_child(vault, refs.quantized, converted) if qtype else None
        done = quantized if qtype else converted
        if done is not None:
            for s in staged:
                vault.blobs.discard(s)
            return AddResult(done, False, False)
        work = _fresh_work_dir(vault.home.tmp)
        try:
            new = _convert(
                vault, sf, refs, parent, converted, (outtype, qtype), tool, work, progress
            )
            staged.extend(blob for _, blob in new)
            new_blob = not vault.blobs.exists(new[-1][1].digest)
            _commit(vault, staged, [] if existing else [parent], [r for r, _ in new])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return AddResult(vault.get(new[-1][0].ref), True, new_blob)


def _commit(
    vault: Vault, staged: list[StagedBlob], folder: list[ModelRecord], made: list[ModelRecord]
) -> None:
    """Blobs into place, then every record in one transaction: all of the import or none."""
    for s in staged:
        vault.blobs.commit(s)
    with vault.catalog.transaction():
        for record in folder + made:
            vault.catalog.insert(record)


def _fresh_work_dir(tmp: Path) -> Path:
    """This process's scratch folder; those of conversions that were killed go first."""
    for d in tmp.glob("convert-*"):
        pid = d.name.removeprefix("convert-")
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)
    work = tmp / f"convert-{os.getpid()}"
    work.mkdir(parents=True)
    return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_taken_early(vault: Vault, refs: Refs) -> None:
    """A name held by something that is not this kind of import fails before any copying."""
    for ref in (refs.converted, refs.quantized):
        found = vault.catalog.find(ref) if ref else None
        if found is not None and (found.derivation or {}).get("operation") not in (
            "convert",
            "quantize",
        ):
            raise InvalidInput(f"'{found.ref}' already names another model: choose another --name")


def _folder_record(
    vault: Vault, sf: folders.StagedFolder, ref: str, origin: Provenance
) -> tuple[ModelRecord, bool]:
    """(record, already catalogued) for the folder; its name must not hold other weights."""
    existing = vault.catalog.find(ref)
    if existing is not None:
        if existing.digest != sf.digest:
            raise InvalidInput(
                f"'{existing.ref}' already names another folder ({existing.digest[:19]}…): "
                "choose another --name, or `freehold rm` it first"
            )
        return existing, True
    texts = folders.license_texts(sf.plan, LICENSE_TEXT_MAX)
    declared = sf.plan.license_ids + [sf.plan.config.get("license")]
    profile = licenses.resolve([d for d in declared if isinstance(d, str)], texts)
    name, tag = parse_ref(ref)
    return folders.folder_record(sf, name, tag, origin, profile.id, _now()), False


def _existing_child(
    vault: Vault, ref: str | None, parent: ModelRecord | None
) -> ModelRecord | None:
    """The model already stored under `ref` from `parent`; a name held otherwise is refused."""
    found = vault.catalog.find(ref) if ref else None
    if found is None:
        return None
    if parent is None or found.parent_digest != parent.digest:
        raise InvalidInput(
            f"'{found.ref}' already names a model made from other weights: choose another --name"
        )
    return found


def _convert(
    vault: Vault,
    sf: folders.StagedFolder,
    refs: Refs,
    parent: ModelRecord,
    converted: ModelRecord | None,
    types: tuple[str, str | None],
    tool: conv.Converter | None,
    work: Path,
    progress: ProgressFactory,
) -> list[tuple[ModelRecord, StagedBlob]]:
    """Run the converter (unless that GGUF is stored already) and the quantizer; stage both."""
    outtype, qtype = types
    new: list[tuple[ModelRecord, StagedBlob]] = []
    if converted is None:
        tool = tool or conv.ensure_converter(_stderr, progress)
        source = sf.materialize(work / refs.stem)
        out = work / f"{source.name}-{outtype.upper()}.gguf"
        expected = sf.plan.tensors.parameters * 2  # 16-bit weights: close to the file's size
        conv.convert(tool, source, out, outtype, expected, progress, label=str(sf.plan.folder))
        derivation = {
            "operation": "convert",
            "converter": conv.SCRIPT,
            "tool": tool.tool,
            "llama_cpp_python": tool.version,
            "sdist_sha256": tool.sdist_sha256,
            "outtype": outtype.upper(),
            "from_format": folders.FORMAT,
        }
        converted, blob = _derived(vault, out, refs.converted, parent, derivation, progress)
        new.append((converted, blob))
        gguf_path = out
    else:
        gguf_path = vault.blob_path(converted)
    if qtype and refs.quantized:
        out = work / f"quantized-{qtype}.gguf"
        result = quantize(gguf_path, out, qtype, label=converted.ref)
        derivation = {
            "operation": "quantize",
            "type": qtype,
            "from_type": result.source_quantization,
            "allow_requantize": False,
            "fallback_tensors": len(result.plan.fallbacks),
            "fit": None,
            "tool": f"llama.cpp (llama-cpp-python {conv.llama_cpp_version()})",
        }
        new.append(_derived(vault, out, refs.quantized, converted, derivation, progress))
    return new


def _derived(
    vault: Vault,
    path: Path,
    ref: str,
    parent: ModelRecord,
    derivation: dict[str, Any],
    progress: ProgressFactory,
) -> tuple[ModelRecord, StagedBlob]:
    """Stage a GGUF made from `parent` (hard-linked: it was written inside the vault's tmp)."""
    name, tag = parse_ref(ref)
    blob = vault.blobs.stage_link(path, progress(f"Storing {ref}", path.stat().st_size))
    filename = f"{name.replace('/', '-')}-{tag}.gguf"
    origin = Provenance("derived", parent.ref, filename, None, parent.digest, derivation)
    try:
        record = new_record(
            read_info(blob.tmp_path, ref), blob, name, tag, origin, parent.license_id
        )
    except BaseException:
        vault.blobs.discard(blob)
        raise
    # Terms and card carry over; the folder's weights and tokenizer files stay with the folder.
    record.files = [
        f
        for f in parent.files
        if parent.format != folders.FORMAT or f.role in folders.CARRIED_ROLES
    ]
    return record, blob


def lineage(vault: Vault, record: ModelRecord) -> list[ModelRecord]:
    """`record` and the records it was made from, nearest first."""
    by_digest = {r.digest: r for r in vault.list()}
    chain = [record]
    while (parent := by_digest.get(chain[-1].parent_digest or "")) and parent not in chain:
        chain.append(parent)
    return chain
