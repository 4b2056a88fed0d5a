"""Portable bundles: carry verified models to another (possibly air-gapped) machine.

A bundle is a plain tar: `manifest.json` first (every blob's digest and size, each model's
catalog entry and license profile), then `manifest.sig` when signed (ed25519 over the exact
manifest bytes, which pin every blob by digest), then `blobs/sha256-<hex>`. Import checks
the signature before reading any blob, accepts only regular files the manifest lists,
re-hashes each while staging it, and commits nothing unless everything checks.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from freehold import __version__
from freehold.atomic import atomic_write
from freehold.errors import IntegrityError, InvalidInput, NotFound
from freehold.vault import folders, licenses
from freehold.vault.blobs import CHUNK, StagedBlob, check_digest, staged_cleanup
from freehold.vault.catalog import ModelFile, ModelRecord, parse_ref
from freehold.vault.gguf_meta import read_info
from freehold.vault.store import ProgressFactory, Provenance, Vault, _no_progress, _now, new_record

FORMAT = "freehold-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MANIFEST_MAX = 16 << 20
PUBKEY_PREFIX = "freehold-ed25519"
_BLOB_MEMBER = re.compile(r"^blobs/sha256-[0-9a-f]{64}$")


# -- keys ----------------------------------------------------------------------------------


def keygen(prefix: Path) -> tuple[Path, Path]:
    """Write PREFIX.key (private, mode 600) and PREFIX.pub; refuse to overwrite."""
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (private, public):
        if p.exists():
            raise InvalidInput(f"{p} already exists: choose another -o PREFIX or remove it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_text(f"{PUBKEY_PREFIX} {_public_b64(key.public_key())}\n")
    return private, public


def _public_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise NotFound(f"no signing key at {path}: make one with `freehold keygen`") from None
    except ValueError:
        raise InvalidInput(f"{path} is not a PEM private key from `freehold keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput(f"{path} is not an ed25519 key: make one with `freehold keygen`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        kind, b64 = path.read_text().split()[:2]
        if kind != PUBKEY_PREFIX:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
    except FileNotFoundError:
        raise NotFound(f"no public key at {path}") from None
    except ValueError:
        raise InvalidInput(
            f"{path} is not a Freehold public key (a line '{PUBKEY_PREFIX} <base64>')"
        ) from None


# -- export --------------------------------------------------------------------------------


def _model_entry(vault: Vault, r: ModelRecord) -> dict[str, Any]:
    entry = r.to_dict()
    entry["license_profile"] = vault.license(r).to_dict()
    return entry


def build_manifest(vault: Vault, records: list[ModelRecord]) -> dict[str, Any]:
    blobs: dict[str, int] = {}
    for r in records:
        blobs[r.digest] = folders.manifest_size(r) if r.format == folders.FORMAT else r.size
        for f in r.files:
            blobs[f.digest] = f.size
    return {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "created_by": f"freehold {__version__}",
        "models": [_model_entry(vault, r) for r in records],
        "blobs": [{"digest": d, "size": s} for d, s in sorted(blobs.items())],
    }


def _member_name(digest: str) -> str:
    return "blobs/" + digest.replace(":", "-")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _Counting(io.RawIOBase):
    """Wraps a blob file so the tar writer reports progress as it reads."""

    def __init__(self, f: BinaryIO, advance: Callable[[int], None]) -> None:
        self.f, self.advance = f, advance

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.advance(len(data))
        return data


def export(
    vault: Vault,
    refs: list[str],
    out: Path,
    sign_key: Path | None = None,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Write a bundle atomically (temp file, fsync, rename). Returns its manifest."""
    progress = progress or _no_progress
    records = list({r.digest + r.ref: r for r in (vault.get(ref) for ref in refs)}.values())
    key = load_private_key(sign_key) if sign_key else None
    manifest = build_manifest(vault, records)
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    for b in manifest["blobs"]:
        if vault.blobs.verify(b["digest"]) != "ok":
            raise IntegrityError(
                f"blob {b['digest']} is damaged in this vault: run `freehold verify`"
            )
    with atomic_write(out) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        _add_bytes(tar, MANIFEST, manifest_bytes)
        if key:
            sig = {
                "algorithm": "ed25519",
                "public_key": _public_b64(key.public_key()),
                "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
            }
            _add_bytes(tar, SIGNATURE, json.dumps(sig).encode())
        total = sum(b["size"] for b in manifest["blobs"])
        advance = progress(f"Exporting to {out.name}", total)
        for b in manifest["blobs"]:
            path = vault.blobs.path(b["digest"])
            info = tar.gettarinfo(str(path), arcname=_member_name(b["digest"]))
            info.mode, info.uid, info.gid, info.uname, info.gname = 0o444, 0, 0, "", ""
            with open(path, "rb") as f:
                tar.addfile(info, _Counting(f, advance))
    return manifest


# -- import --------------------------------------------------------------------------------


@dataclass
class ImportResult:
    added: list[ModelRecord]
    skipped: list[str]  # refs already present with the same weights
    signed_by: str | None


def _bad(bundle: Path, why: str) -> InvalidInput:
    return InvalidInput(f"refusing bundle {bundle}: {why}; nothing was imported")


def _check_member(bundle: Path, m: tarfile.TarInfo, expected: dict[str, int]) -> None:
    name = m.name
    if name.startswith("/") or ".." in Path(name).parts:
        raise _bad(bundle, f"member '{name}' points outside the vault")
    if not m.isfile():
        raise _bad(bundle, f"member '{name}' is a link or special file, not a regular file")
    if not _BLOB_MEMBER.match(name) or name not in expected:
        raise _bad(bundle, f"member '{name}' is not listed in its manifest")
    if m.size != expected[name]:
        raise _bad(
            bundle, f"member '{name}' has {m.size} bytes, its manifest says {expected[name]}"
        )


def _read_small(bundle: Path, tar: tarfile.TarFile, m: tarfile.TarInfo | None, want: str) -> bytes:
    if m is None or m.name != want or not m.isfile() or m.size > MANIFEST_MAX:
        raise _bad(bundle, f"it does not start with a valid {want}")
    f = tar.extractfile(m)
    assert f is not None
    return f.read()


def _verify_signature(
    bundle: Path, manifest_bytes: bytes, sig_bytes: bytes | None, trust: list[Path]
) -> str | None:
    if not trust:
        return None
    if sig_bytes is None:
        raise _bad(bundle, "it is not signed, and --trust asks for a signature")
    try:
        sig = json.loads(sig_bytes)
        signature = base64.b64decode(sig["signature"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise _bad(bundle, "its signature file is malformed") from None
    for path in trust:
        try:
            load_public_key(path).verify(signature, manifest_bytes)
            return str(path)
        except InvalidSignature:
            continue
    raise IntegrityError(
        f"refusing bundle {bundle}: its signature does not match any trusted key "
        f"({', '.join(str(t) for t in trust)}); nothing was imported"
    )


def _parse_manifest(bundle: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            raise ValueError
        for b in manifest["blobs"]:
            check_digest(b["digest"])
            int(b["size"])
        for m in manifest["models"]:
            parse_ref(m["ref"])
    except (ValueError, KeyError, TypeError, InvalidInput):
        raise _bad(bundle, f"its manifest is not a valid {FORMAT} manifest") from None
    return manifest


def import_bundle(
    vault: Vault,
    bundle: Path,
    trust: list[Path] | None = None,
    progress: ProgressFactory | None = None,
) -> ImportResult:
    progress = progress or _no_progress
    if not bundle.is_file():
        raise NotFound(f"no bundle at {bundle}")
    staged: dict[str, StagedBlob] = {}
    cleanup: list[StagedBlob] = []
    try:
        tar = tarfile.open(bundle, mode="r:")
    except tarfile.TarError:
        raise _bad(bundle, "it is not a tar file") from None
    with tar, staged_cleanup(vault.blobs, cleanup):
        first = tar.next()
        manifest_bytes = _read_small(bundle, tar, first, MANIFEST)
        manifest = _parse_manifest(bundle, manifest_bytes)
        member = tar.next()
        sig_bytes = None
        if member is not None and member.name == SIGNATURE:
            sig_bytes = _read_small(bundle, tar, member, SIGNATURE)
            member = tar.next()
        signer = _verify_signature(bundle, manifest_bytes, sig_bytes, trust or [])
        expected = {_member_name(b["digest"]): int(b["size"]) for b in manifest["blobs"]}
        advance = progress(f"Importing {bundle.name}", sum(expected.values()))
        while member is not None:
            _check_member(bundle, member, expected)
            if member.name in staged:
                raise _bad(bundle, f"member '{member.name}' appears twice")
            staged[member.name] = _stage_member(vault, bundle, tar, member, advance)
            cleanup.append(staged[member.name])
            member = tar.next()
        missing = sorted(set(expected) - set(staged))
        if missing:
            raise _bad(bundle, f"it lacks {len(missing)} listed blob(s), first {missing[0]}")
        return _commit(vault, bundle, manifest, staged, signer)


def _stage_member(
    vault: Vault,
    bundle: Path,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    advance: Callable[[int], None],
) -> StagedBlob:
    f = tar.extractfile(member)
    assert f is not None
    digest = member.name.removeprefix("blobs/").replace("-", ":", 1)

    def chunks() -> Iterator[bytes]:
        while data := f.read(CHUNK):
            yield data

    try:
        return vault.blobs.stage(chunks(), expected=digest, progress=advance)
    except IntegrityError:
        raise IntegrityError(
            f"refusing bundle {bundle}: blob {digest} does not match its digest (the bundle is "
            "corrupt or was tampered with); nothing was imported"
        ) from None


def _commit(
    vault: Vault,
    bundle: Path,
    manifest: dict[str, Any],
    staged: dict[str, StagedBlob],
    signer: str | None,
) -> ImportResult:
    by_digest = {s.digest: s for s in staged.values()}
    records, skipped = [], []
    for entry in manifest["models"]:
        record = _record_from_entry(bundle, entry, by_digest)
        existing = vault.catalog.find(record.ref)
        if existing is not None and existing.digest == record.digest:
            skipped.append(record.ref)
        elif existing is not None:
            raise _bad(bundle, f"'{record.ref}' already names other weights in this vault")
        else:
            records.append(record)
    for s in by_digest.values():
        vault.blobs.commit(s)
    with vault.catalog.transaction():
        for r in records:
            r.aliases = [a for a in r.aliases if not vault.catalog.name_taken(*parse_ref(a))]
            vault.catalog.insert(r)
    return ImportResult([vault.get(r.ref) for r in records], skipped, signer)


def _record_from_entry(
    bundle: Path, entry: dict[str, Any], staged: dict[str, StagedBlob]
) -> ModelRecord:
    """Catalog facts come from re-reading the staged weights, not from the manifest's claims."""
    weights = staged.get(entry["digest"])
    if weights is None:
        raise _bad(bundle, f"model {entry['ref']} has no weights blob")
    name, tag = parse_ref(entry["ref"])
    origin = Provenance(
        "bundle",
        f"{bundle.name} (originally {entry.get('source_location')})",
        entry.get("original_filename"),
        entry.get("upstream_revision"),
        entry.get("parent_digest"),
        entry.get("derivation"),
    )
    license_id = licenses.by_id(str(entry.get("license_id", "unknown"))).id
    if entry.get("format") == folders.FORMAT:  # a kept safetensors folder: its manifest blob
        try:
            return folders.record_from_staged(
                weights, staged, name, tag, origin, license_id, _now()
            )
        except InvalidInput as e:
            raise _bad(bundle, str(e)) from None
    record = new_record(
        read_info(weights.tmp_path, entry["ref"]), weights, name, tag, origin, license_id
    )
    record.files = [
        ModelFile(f["role"], f["filename"], f["digest"], int(f["size"]))
        for f in entry.get("files", [])
    ]
    record.aliases = list(entry.get("aliases", []))
    return record
