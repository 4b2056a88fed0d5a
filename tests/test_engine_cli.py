"""`freehold run` and `freehold chat` on the real SmolLM2 model."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from freehold.cli import app

runner = CliRunner()


def test_run_streams_a_greedy_reply(smollm2_path: Path) -> None:
    args = ["run", str(smollm2_path), "What is 2+2?", "--temperature", "0", "--max-tokens", "16"]
    r = runner.invoke(app, [*args, "--threads", "1", "--ctx", "512"])
    assert r.exit_code == 0, r.output
    assert "4" in r.output


def test_run_json_has_usage_and_timings(smollm2_path: Path) -> None:
    args = ["run", str(smollm2_path), "Say hi", "--json", "--max-tokens", "8", "--seed", "7"]
    r = runner.invoke(app, [*args, "--threads", "1", "--ctx", "512"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["usage"]["completion_tokens"] <= 8 and data["usage"]["prompt_tokens"] > 0
    assert data["finish_reason"] in ("stop", "length")
    assert data["timings"]["ttft_s"] > 0 and data["seed"] == 7
    # Same seed, same text.
    again = json.loads(runner.invoke(app, [*args, "--threads", "1", "--ctx", "512"]).output)
    assert again["text"] == data["text"]


def test_run_raw_completion_with_stop(smollm2_path: Path) -> None:
    args = ["run", str(smollm2_path), "1, 2, 3, 4,", "--raw", "--temperature", "0"]
    r = runner.invoke(app, [*args, "--max-tokens", "24", "--stop", "7", "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert "7" not in data["text"] and data["finish_reason"] == "stop"
    assert data["text"].startswith(" 5, 6,")


def test_run_missing_model_is_a_clear_error(tmp_path: Path, home: Path) -> None:
    r = runner.invoke(app, ["run", str(tmp_path / "nope.gguf"), "hi"])
    assert r.exit_code != 0


def test_chat_with_piped_stdin(smollm2_path: Path) -> None:
    args = ["chat", str(smollm2_path), "--temperature", "0", "--max-tokens", "16", "--threads", "1"]
    r = runner.invoke(app, [*args, "--ctx", "1024"], input="What is 2+2?\n/reset\nHi\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "4" in r.output
    assert "conversation cleared" in r.output


def test_run_by_vault_name(smollm2_path: Path, home: Path) -> None:
    added = runner.invoke(app, ["add", str(smollm2_path), "--name", "smol", "--link"])
    assert added.exit_code == 0, added.output
    args = ["run", "smol", "What is 2+2?", "--temperature", "0", "--max-tokens", "12"]
    r = runner.invoke(app, [*args, "--threads", "1", "--ctx", "512", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["model"] == "smol"


def test_chat_refuses_a_base_model(gemma_path: Path) -> None:
    r = runner.invoke(app, ["chat", str(gemma_path), "--threads", "1"], input="/exit\n")
    assert r.exit_code != 0
    assert "no chat template" in str(r.exception) or "no chat template" in r.output


def test_run_base_model_needs_raw(gemma_path: Path) -> None:
    base = ["run", str(gemma_path), "The capital of France is", "--threads", "1", "--ctx", "256"]
    r = runner.invoke(app, [*base, "--max-tokens", "4"])
    assert r.exit_code != 0
    r = runner.invoke(app, [*base, "--max-tokens", "4", "--raw", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert r.output.strip()
