"""`freehold run` and `freehold chat` on the real SmolLM2 model."""

from __future__ import annotations

from pathlib import Path


def test_run_streams_a_greedy_reply(smollm2_path: Path, cli) -> None:
    args = ["run", smollm2_path, "What is 2+2?", "--temperature", "0", "--max-tokens", "16"]
    r = cli(*args, "--threads", "1", "--ctx", "512")
    assert r.code == 0, r.err
    assert "4" in r.out


def test_run_json_has_usage_and_timings(smollm2_path: Path, cli) -> None:
    args = ["run", smollm2_path, "Say hi", "--json", "--max-tokens", "8", "--seed", "7"]
    r = cli(*args, "--threads", "1", "--ctx", "512")
    assert r.code == 0, r.err
    data = r.json()
    assert data["usage"]["completion_tokens"] <= 8 and data["usage"]["prompt_tokens"] > 0
    assert data["finish_reason"] in ("stop", "length")
    assert data["timings"]["ttft_s"] > 0 and data["seed"] == 7
    # Same seed, same text.
    again = cli(*args, "--threads", "1", "--ctx", "512").json()
    assert again["text"] == data["text"]


def test_run_reads_the_prompt_from_stdin(smollm2_path: Path, cli) -> None:
    args = ["run", smollm2_path, "--temperature", "0", "--max-tokens", "16", "--json"]
    piped = cli(*args, "--threads", "1", "--ctx", "512", input="What is 2+2?")
    assert piped.code == 0, piped.err
    given = cli("run", smollm2_path, "What is 2+2?", *args[2:], "--threads", "1", "--ctx", "512")
    assert piped.json()["text"] == given.json()["text"]


def test_run_raw_completion_with_stop(smollm2_path: Path, cli) -> None:
    args = ["run", smollm2_path, "1, 2, 3, 4,", "--raw", "--temperature", "0"]
    r = cli(*args, "--max-tokens", "24", "--stop", "7", "--json", "--threads", "1")
    assert r.code == 0, r.err
    data = r.json()
    assert "7" not in data["text"] and data["finish_reason"] == "stop"
    assert data["text"].startswith(" 5, 6,")


def test_run_missing_model_is_a_clear_error(tmp_path: Path, home: Path, cli) -> None:
    r = cli("run", tmp_path / "nope.gguf", "hi")
    assert r.code != 0 and r.out == ""
    assert r.err.startswith("error:") and "nope.gguf" in r.err


def test_chat_with_piped_stdin(smollm2_path: Path, cli) -> None:
    args = ["chat", smollm2_path, "--temperature", "0", "--max-tokens", "16", "--threads", "1"]
    r = cli(*args, "--ctx", "1024", input="What is 2+2?\n/reset\nHi\n/exit\n")
    assert r.code == 0, r.err
    assert "4" in r.out
    assert "conversation cleared" in r.err


def test_run_by_vault_name(smollm2_path: Path, home: Path, cli) -> None:
    added = cli("add", smollm2_path, "--name", "smol", "--link")
    assert added.code == 0, added.err
    args = ["run", "smol", "What is 2+2?", "--temperature", "0", "--max-tokens", "12"]
    r = cli(*args, "--threads", "1", "--ctx", "512", "--json")
    assert r.code == 0, r.err
    assert r.json()["model"] == "smol"


def test_chat_refuses_a_base_model(gemma_path: Path, cli) -> None:
    r = cli("chat", gemma_path, "--threads", "1", input="/exit\n")
    assert r.code != 0
    assert r.err.startswith("error:") and "no chat template" in r.err


def test_run_base_model_needs_raw(gemma_path: Path, cli) -> None:
    base = ["run", gemma_path, "The capital of France is", "--threads", "1", "--ctx", "256"]
    r = cli(*base, "--max-tokens", "4")
    assert r.code != 0 and "no chat template" in r.err
    r = cli(*base, "--max-tokens", "4", "--raw", "--temperature", "0")
    assert r.code == 0, r.err
    assert r.out.strip()
