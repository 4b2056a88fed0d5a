"""Hugging Face model folders (safetensors) kept whole in the vault, as the authoritative copy.

A folder becomes one catalog record with format "safetensors": every file it needs (config,
tokenizer, weights, generation config, license, card) is a verified blob listed in the
record's files, and a small JSON manifest (relative path → digest, size, role) is a blob too,
whose digest is the record's digest. So a folder has one content address, `verify` re-hashes
every file, `gc` keeps them, and bundles carry them like any other model's files. GGUFs
converted from the folder name that digest as their parent.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freehold.errors import InvalidInput, NotFound
from freehold.vault.blobs import StagedBlob
from freehold.vault.catalog import ModelFile, ModelRecord
from freehold.vault.importers import LICENSE_NAME_RE, card_license
from freehold.vault.store import Provenance, Vault

MANIFEST_FORMAT = "freehold-safetensors-folder/1"
FORMAT = "safetensors"
HEADER_MAX = 100 << 20  # safetensors' own limit on a header's JSON
CARRIED_ROLES = ("license", "notice", "readme")  # what a converted GGUF keeps of its folder

# Top-level files a model folder needs; anything else (other formats, code, images) stays out.
_TOKENIZER_JSON = r"tokenizer.*|special_tokens_map|added_tokens|vocab|preprocessor_config"
_TOKENIZER_OTHER = r"merges\.txt|vocab\.txt|tokenizer\.model|.+\.tiktoken|chat_template\.jinja"
_ROLES = (
    (re.compile(r".+\.safetensors$"), "weights"),
    (re.compile(r"^(config|generation_config|.+\.safetensors\.index)\.json$"), "config"),
    (re.compile(rf"^({_TOKENIZER_JSON})\.json$"), "tokenizer"),
    (re.compile(rf"^({_TOKENIZER_OTHER})$"), "tokenizer"),
    (re.compile(r"^README\.md$", re.I), "readme"),
)
_DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16,
    "I16": 16, "U16": 16, "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
}  # fmt: skip


@dataclass
class FolderFile:
    role: str  # weights | config | tokenizer | readme | license | notice
    path: str  # relative to the folder
    source: Path


@dataclass
class TensorFacts:
    parameters: int
    data_bytes: int
    dtypes: dict[str, int]  # dtype → parameter count

    @property
    def main_dtype(self) -> str:
        return max(self.dtypes, key=lambda d: self.dtypes[d]) if self.dtypes else "unknown"


@dataclass
class FolderPlan:
    folder: Path
    files: list[FolderFile]
    config: dict[str, Any]
    tensors: TensorFacts
    license_ids: list[str]

    @property
    def architecture(self) -> str:
        arches = self.config.get("architectures") or []
        return str(arches[0]) if arches else str(self.config.get("model_type", "unknown"))


# -- reading a folder --------------------------------------------------------------------------


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _role(name: str) -> str | None:
    if LICENSE_NAME_RE.match(name):
        return "notice" if name.upper().startswith("NOTICE") else "license"
    return next((role for pattern, role in _ROLES if pattern.match(name)), None)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InvalidInput(
            f"{folder} has no config.json, so it is not a Hugging Face model folder: give the "
            "folder that holds config.json and the *.safetensors weights, or a .gguf file"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(
            f"{path} is not valid JSON: the folder is damaged; fetch it again"
        ) from None
    return config


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, checked against the file's real length."""
    size = path.stat().st_size
    damaged = f"{path.name} is not a valid safetensors file"
    again = "the copy is incomplete or corrupt: fetch it again"
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or n > HEADER_MAX or 8 + n > size:
            raise InvalidInput(f"{damaged} (its header length is wrong): {again}")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            ends = [_tensor_end(name, t) for name, t in tensors.items()]
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            raise InvalidInput(f"{damaged} (its header is not a tensor table): {again}") from None
    if max(ends, default=0) != size - 8 - n:
        raise InvalidInput(
            f"{damaged}: its header describes {max(ends, default=0)} bytes of tensor data, the "
            f"file holds {size - 8 - n}; {again}"
        )
    return tensors


def _tensor_end(name: str, t: dict[str, Any]) -> int:
    begin, end = (int(x) for x in t["data_offsets"])
    elements = math.prod(int(d) for d in t["shape"])
    if end - begin != elements * _DTYPE_BITS[t["dtype"]] // 8 or begin < 0:
        raise ValueError(name)
    return end


def _tensor_facts(weights: list[Path]) -> TensorFacts:
    facts = TensorFacts(0, 0, {})
    for path in weights:
        for t in read_safetensors_header(path).values():
            n = math.prod(int(d) for d in t["shape"])
            facts.parameters += n
            facts.data_bytes += n * _DTYPE_BITS[t["dtype"]] // 8
            facts.dtypes[t["dtype"]] = facts.dtypes.get(t["dtype"], 0) + n
    return facts


def scan_folder(folder: Path) -> FolderPlan:
    """What to keep of a model folder; refuses one that cannot be a complete model."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise NotFound(f"{folder} is not a directory")
    config = _read_config(folder)
    files = [
        FolderFile(role, p.name, p)
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and (role := _role(p.name))
    ]
    weights = [f.source for f in files if f.role == "weights"]
    if not weights:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (it has {', '.join(bins[:3])}: PyTorch pickles are not read)" if bins else ""
        raise InvalidInput(
            f"{folder} has no *.safetensors weights{hint}: Freehold converts safetensors "
            "models only; use the repo's safetensors revision or a GGUF"
        )
    tensors = _tensor_facts(weights)
    return FolderPlan(folder.resolve(), files, config, tensors, card_license(folder))


# -- storing it --------------------------------------------------------------------------------


@dataclass
class StagedFolder:
    """Every file of a folder staged (hashed, fsynced, not yet visible), plus its manifest."""

    plan: FolderPlan
    files: list[tuple[FolderFile, StagedBlob]]
    manifest: StagedBlob

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def staged(self) -> list[StagedBlob]:
        return [s for _, s in self.files] + [self.manifest]

    def materialize(self, where: Path) -> Path:
        """The folder again, as symlinks to the staged bytes: what is converted is what is kept."""
        where.mkdir(parents=True)
        for f, s in self.files:
            os.symlink(s.tmp_path, where / f.path)
        return where


def manifest_bytes(files: list[tuple[str, str, int, str]]) -> bytes:
    """(path, digest, size, role) rows → the canonical manifest whose digest names the folder."""
    rows = [{"path": p, "digest": d, "size": s, "role": r} for p, d, s, r in sorted(files)]
    return json.dumps({"format": MANIFEST_FORMAT, "files": rows}, sort_keys=True).encode()


def stage_folder(vault: Vault, plan: FolderPlan, progress: Any, link: bool = False) -> StagedFolder:
    """Hash and stage every file (one pass each); the caller commits or discards them."""
    staged: list[tuple[FolderFile, StagedBlob]] = []
    total = sum(f.source.stat().st_size for f in plan.files)
    advance = progress(f"Storing {plan.folder.name}", total)
    try:
        for f in plan.files:
            if link and f.role == "weights":
                blob = vault.blobs.stage_link(f.source, advance)
            else:
                blob = vault.blobs.stage_file(f.source, progress=advance)
            staged.append((f, blob))
        rows = [(f.path, s.digest, s.size, f.role) for f, s in staged]
        manifest = vault.blobs.stage(iter([manifest_bytes(rows)]))
    except BaseException:
        for _, s in staged:
            vault.blobs.discard(s)
        raise
    return StagedFolder(plan, staged, manifest)


def folder_record(
    sf: StagedFolder, name: str, tag: str, origin: Provenance, license_id: str, now: str
) -> ModelRecord:
    """The catalog entry: facts from config.json and the safetensors headers themselves."""
    c, t = sf.plan.config, sf.plan.tensors
    text_config = c.get("text_config") if isinstance(c.get("text_config"), dict) else {}

    def fact(key: str) -> Any:
        value = c.get(key, text_config.get(key))
        return value if isinstance(value, int) else None

    record = ModelRecord(
        name=name,
        tag=tag,
        digest=sf.digest,
        size=sf.manifest.size + sum(s.size for _, s in sf.files),
        format=FORMAT,
        kind="model",
        architecture=sf.plan.architecture,
        parameters=t.parameters,
        quantization=t.main_dtype,
        bits_per_weight=round(8 * t.data_bytes / t.parameters, 3) if t.parameters else None,
        context_length=fact("max_position_embeddings"),
        layers=fact("num_hidden_layers"),
        embedding_length=fact("hidden_size"),
        vocab_size=fact("vocab_size"),
        has_chat_template=_has_chat_template(sf.plan),
        metadata={
            "model_type": c.get("model_type"),
            "architectures": c.get("architectures"),
            "dtypes": t.dtypes,
            "manifest_format": MANIFEST_FORMAT,
        },
        source_kind=origin.source_kind,
        source_location=origin.source_location,
        original_filename=origin.original_filename,
        upstream_revision=origin.upstream_revision,
        imported_at=now,
        parent_digest=None,
        derivation=None,
        license_id=license_id,
    )
    record.files = [ModelFile(f.role, f.path, s.digest, s.size) for f, s in sf.files]
    return record


def _has_chat_template(plan: FolderPlan) -> bool:
    sources = {f.path: f.source for f in plan.files}
    if "chat_template.jinja" in sources:
        return True
    try:
        tokenizer_config = json.loads(sources["tokenizer_config.json"].read_text(encoding="utf-8"))
        return bool(tokenizer_config.get("chat_template"))
    except (KeyError, OSError, ValueError, AttributeError):
        return False


def license_texts(plan: FolderPlan, limit: int) -> list[str]:
    return [
        f.source.read_text(encoding="utf-8", errors="replace")
        for f in plan.files
        if f.role in ("license", "notice") and f.source.stat().st_size <= limit
    ]


def manifest_size(record: ModelRecord) -> int:
    """Bytes of a folder record's own blob, its manifest (its size counts every file)."""
    return record.size - sum(f.size for f in record.files)


def files_from_manifest(data: bytes) -> list[ModelFile]:
    """A folder manifest blob → the files it lists (for a record rebuilt from a bundle)."""
    try:
        manifest = json.loads(data)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError
        return [
            ModelFile(str(f["role"]), str(f["path"]), str(f["digest"]), int(f["size"]))
            for f in manifest["files"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInput(f"not a {MANIFEST_FORMAT} manifest") from None


def record_from_staged(
    manifest: StagedBlob,
    blobs: dict[str, StagedBlob],
    name: str,
    tag: str,
    origin: Provenance,
    license_id: str,
    now: str,
) -> ModelRecord:
    """A folder record rebuilt from staged blobs (a bundle's): facts re-read from the bytes."""
    listed = files_from_manifest(manifest.tmp_path.read_bytes())
    missing = [f.filename for f in listed if f.digest not in blobs]
    if missing:
        raise InvalidInput(f"the folder of {name}:{tag} lacks {missing[0]}")
    files = [
        (FolderFile(f.role, f.filename, blobs[f.digest].tmp_path), blobs[f.digest]) for f in listed
    ]
    config = next((ff.source for ff, _ in files if ff.path == "config.json"), None)
    if config is None:
        raise InvalidInput(f"the folder of {name}:{tag} has no config.json")
    plan = FolderPlan(
        Path(name),
        [ff for ff, _ in files],
        json.loads(config.read_text(encoding="utf-8")),
        _tensor_facts([ff.source for ff, _ in files if ff.role == "weights"]),
        [],
    )
    return folder_record(StagedFolder(plan, files, manifest), name, tag, origin, license_id, now)
