"""Perplexity and KL divergence on the real starter models, kept short with --ctx 256."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from llama_reference import reference_llama

from freehold.errors import InvalidInput
from freehold.measure import eval as quality

CTX, CHUNKS = 256, 2
# One thread: llama.cpp's spinning thread barrier crawls when cores are shared with other work.
THREADS = 1


def test_same_model_as_reference_has_zero_kl(smollm2_path: Path, home: Path, cli) -> None:
    args = ["eval", smollm2_path, "--reference", smollm2_path]
    result = cli(*args, "--ctx", CTX, "--max-chunks", CHUNKS, "--threads", THREADS, "--json")
    assert result.code == 0, result.err
    r = result.json()
    assert abs(r["mean_kl"]) <= 1e-6 and abs(r["kl_p99"]) <= 1e-6
    assert r["perplexity"] == r["reference_perplexity"]
    assert r["top1_agreement"] == 1.0
    assert r["chunks"] == CHUNKS and r["tokens_scored"] == CHUNKS * (CTX // 2 - 1)
    assert 1.0 < r["perplexity"] < 1000.0


@pytest.mark.parametrize(("fixture", "ctx"), [("smollm2_path", CTX), ("gemma_path", 128)])
def test_perplexity_matches_an_independent_llama_computation(
    fixture: str, ctx: int, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(fixture)
    ours = quality.evaluate(path, ctx=ctx, max_chunks=CHUNKS, threads=THREADS)
    # Independently: the high-level API with every logit kept, and a plain-loop log-softmax.
    llm = reference_llama(
        path,
        n_ctx=ctx,
        n_batch=ctx,
        n_ubatch=ctx,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=True,
        verbose=False,
    )
    tokens = llm.tokenize(quality.default_text().encode(), add_bos=True, special=False)
    adds_bos = tokens[0] == llm.token_bos()  # Gemma does, SmolLM2 does not
    nll = []
    for c in range(CHUNKS):
        chunk = list(tokens[c * ctx : (c + 1) * ctx])
        if adds_bos:
            chunk[0] = llm.token_bos()  # every chunk starts like a document
        llm.reset()
        llm.eval(chunk)
        for j in range(ctx // 2, ctx - 1):
            row = np.asarray(llm.scores[j], dtype=np.float64)
            top = row.max()
            nll.append(top + np.log(np.exp(row - top).sum()) - row[chunk[j + 1]])
    llm.close()
    assert ours.tokens_scored == len(nll)
    assert ours.perplexity == pytest.approx(float(np.exp(np.mean(nll))), abs=1e-3)


def test_different_vocabularies_are_refused(
    smollm2_path: Path, gemma_path: Path, home: Path, cli
) -> None:
    result = cli("eval", smollm2_path, "--reference", gemma_path, "--ctx", "64")
    assert result.code == InvalidInput.exit_code and result.out == ""
    err = result.err
    sizes = {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]{3,}", err)}
    assert 49152 in sizes and len(sizes) == 2, err  # both vocab sizes named
    assert "vocabulary" in err


def test_kl_maths_on_known_distributions() -> None:
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    model = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]))
    nll, ref_nll, kl, agree = quality.score_rows(model + 3.0, np.array([0, 2]), ref - 1.0)
    assert nll == pytest.approx([np.log(4), -np.log(0.7)])
    assert ref_nll == pytest.approx([np.log(2), -np.log(0.7)])
    # KL(ref || model) = 0.5 ln 2 + 0.25 ln 0.5 for row 0; identical rows give 0.
    assert kl == pytest.approx([0.5 * np.log(2) + 0.25 * np.log(0.5), 0.0], abs=1e-12)
    assert agree.tolist() == [False, True]
    big = np.array([[1000.0, 0.0, -1000.0]])
    assert np.isfinite(quality.log_softmax(big)).all()


def test_text_too_short_and_bad_args(smollm2_path: Path) -> None:
    with pytest.raises(InvalidInput, match="fewer than one chunk"):
        quality.evaluate(smollm2_path, text="Too short.", ctx=64)
    with pytest.raises(InvalidInput, match="--ctx"):
        quality.evaluate(smollm2_path, ctx=4)


def test_bundled_corpus_is_a_few_thousand_words() -> None:
    words = quality.default_text().split()
    assert 2500 <= len(words) <= 3500
