"""Quality of a model against a reference, by llama.cpp's perplexity method.

The text's tokens are cut into chunks of `ctx` tokens; each chunk is evaluated from an empty
cache (its first token replaced by BOS when the model adds one) and only the second half of
each chunk is scored, so every scored token has at least ctx/2 tokens of context. With a
reference model, the full next-token distributions of both are compared at every scored
position: KL(reference || model), and whether their top tokens agree.

Logits come from llama.cpp's low-level API (only the scored rows are requested); the maths is
numpy in float64.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from freehold.config import Paths
from freehold.engine.adapters import attach_lora
from freehold.engine.devices import GpuLayers, resolve_offload
from freehold.engine.model import load_params
from freehold.errors import FreeholdError, InvalidInput, NotFound
from freehold.vault import ModelSpec, resolve_model_spec

ROW_BLOCK = 32  # rows of logits turned to float64 at once: bounds memory for 256k vocabularies

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalResult:
    """Perplexity of a model, and its divergence from a reference when one was given."""

    model: str
    reference: str | None
    text: str
    ctx: int
    chunks: int
    tokens_scored: int
    perplexity: float
    perplexity_err: float
    reference_perplexity: float | None = None
    mean_kl: float | None = None
    median_kl: float | None = None
    kl_p99: float | None = None
    max_kl: float | None = None
    top1_agreement: float | None = None
    offload: dict[str, Any] | None = None  # what went on the GPU for the scored model

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_text() -> str:
    """The bundled English corpus written for Freehold."""
    return files("freehold.measure").joinpath("data", "corpus.txt").read_text(encoding="utf-8")


def load_text(path: Path) -> str:
    """A user's evaluation text, as UTF-8."""
    if not path.is_file():
        raise NotFound(f"text file {path} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text: convert it or pick another file") from None


def resolve_model(ref: str, home: Paths) -> ModelSpec:
    """A vault name in `home`, a .gguf path, or BASE+ADAPTER to what to load."""
    return resolve_model_spec(ref, home)


def _spec(model: Path | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec(str(model), Path(model))


# ---- llama.cpp, low level -------------------------------------------------------------------


def _llama() -> Any:
    import llama_cpp

    # llama.cpp logs every tensor while loading; keep only errors.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


class _Scorer:
    """One model and one context big enough for a chunk."""

    def __init__(
        self,
        path: Path,
        ctx: int,
        threads: int,
        vocab_only: bool = False,
        adapters: tuple[Path, ...] = (),
        gpu_layers: GpuLayers = 0,
    ) -> None:
        ll = _llama()
        ll.llama_backend_init()
        self.ll = ll
        self.offload = None
        if not vocab_only:
            self.offload = resolve_offload(gpu_layers, path, slots=1, ctx_per_slot=ctx, n_batch=ctx)
        params = load_params(
            vocab_only=vocab_only, gpu_layers=self.offload.gpu_layers if self.offload else 0
        )
        self.model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise InvalidInput(f"{path} could not be loaded as a GGUF model")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(ll.llama_vocab_bos(self.vocab))
        self.ctx = None
        self.batch = None
        if vocab_only:
            return
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = ctx
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        # Plain attention keeps softmax in float32; the CPU flash-attention path rounds to f16.
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise FreeholdError(f"llama.cpp could not make a {ctx}-token context for {path}")
        self.batch = ll.llama_batch_init(ctx, 0, 1)
        try:
            attach_lora(self.model, self.ctx, adapters, path.name)
        except FreeholdError:
            self.close()
            raise

    def tokenize(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self.ll.llama_token * cap)()
        n = self.ll.llama_tokenize(self.vocab, raw, len(raw), buf, cap, True, False)
        if n < 0:
            raise FreeholdError("tokenizing the text failed")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """Logits (float32 copy) at positions first .. len-2, each predicting the next token."""
        ll, b, n = self.ll, self.batch, len(tokens)
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        for i, tok in enumerate(tokens):
            b.token[i] = int(tok)
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = first <= i < n - 1
        b.n_tokens = n
        rc = ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise FreeholdError(f"llama_decode failed with code {rc}")
        rows = n - 1 - first
        ptr = ll.llama_get_logits(self.ctx)
        flat = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows * self.n_vocab,)
        )
        return flat.reshape(rows, self.n_vocab).copy()

    def close(self) -> None:
        ll = self.ll
        if self.batch is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None


@contextmanager
def _scorer(
    model: Path | ModelSpec,
    ctx: int,
    threads: int,
    vocab_only: bool = False,
    gpu_layers: GpuLayers = 0,
) -> Iterator[_Scorer]:
    spec = _spec(model)
    adapters = () if vocab_only else spec.adapters
    s = _Scorer(spec.path, ctx, threads, vocab_only, adapters, gpu_layers)
    try:
        yield s
    finally:
        s.close()


# ---- maths ----------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def score_rows(
    model_logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Per row: model NLL, reference NLL, KL(ref || model), top-1 agreement."""
    nll, ref_nll, kl, agree = [], [], [], []
    for s in range(0, len(targets), ROW_BLOCK):
        lp = log_softmax(model_logits[s : s + ROW_BLOCK])
        t = targets[s : s + ROW_BLOCK]
        rows = np.arange(len(t))
        nll.append(-lp[rows, t])
        if ref_logits is not None:
            lq = log_softmax(ref_logits[s : s + ROW_BLOCK])
            ref_nll.append(-lq[rows, t])
            kl.append(np.maximum((np.exp(lq) * (lq - lp)).sum(axis=1), 0.0))
            agree.append(lq.argmax(axis=1) == lp.argmax(axis=1))
    if ref_logits is None:
        return np.concatenate(nll), None, None, None
    return (np.concatenate(nll), np.concatenate(ref_nll), np.concatenate(kl), np.concatenate(agree))


def _ppl(nll: np.ndarray) -> tuple[float, float]:
    """Perplexity and its standard error (delta method on the mean NLL)."""
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / np.sqrt(nll.size)) if nll.size > 1 else 0.0
    ppl = float(np.exp(mean))
    return ppl, ppl * se


# ---- the evaluation -------------------------------------------------------------------------


def _check_vocab(model: Path | ModelSpec, reference: Path | ModelSpec, text: str) -> None:
    """Refuse pairs whose next-token distributions are not over the same tokens."""
    mname, rname = _spec(model).ref, _spec(reference).ref
    with _scorer(model, 0, 1, vocab_only=True) as m, _scorer(reference, 0, 1, True) as r:
        if m.n_vocab != r.n_vocab:
            raise InvalidInput(
                f"{mname} has a vocabulary of {m.n_vocab} tokens and {rname} of "
                f"{r.n_vocab}: KL divergence needs the same vocabulary; pick a reference "
                "from the same model family"
            )
        if not np.array_equal(m.tokenize(text), r.tokenize(text)):
            raise InvalidInput(
                f"{mname} and {rname} both have {m.n_vocab} tokens but tokenize "
                "the text differently: pick a reference from the same model family"
            )


def evaluate(
    model: Path | ModelSpec,
    reference: Path | ModelSpec | None = None,
    text: str | None = None,
    *,
    ctx: int = 512,
    max_chunks: int | None = None,
    threads: int | None = None,
    text_name: str = "bundled corpus",
    progress: Progress | None = None,
    gpu_layers: GpuLayers = "auto",
) -> EvalResult:
    """Perplexity of `model` on `text` (default: the bundled corpus), and, with a `reference`,
    mean / median / p99 / max KL(reference || model) and top-1 agreement.

    `gpu_layers` (`--gpu-layers`) applies to both models; the result says what was offloaded.
    """
    if ctx < 8:
        raise InvalidInput(f"--ctx must be at least 8 tokens, got {ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise InvalidInput("--max-chunks must be at least 1")
    text = default_text() if text is None else text
    threads = threads or os.cpu_count() or 1
    if reference is not None:
        _check_vocab(model, reference, text)
    first = ctx // 2
    with _scorer(model, ctx, threads, gpu_layers=gpu_layers) as m:
        tokens = m.tokenize(text)
        n_chunks = len(tokens) // ctx
        if max_chunks is not None:
            n_chunks = min(n_chunks, max_chunks)
        if n_chunks < 1:
            raise InvalidInput(
                f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}: "
                "give a longer text or a smaller --ctx"
            )
        offload = m.offload.to_json() if m.offload else None
        with _maybe_scorer(reference, ctx, threads, gpu_layers) as r:
            parts = _score_chunks(m, r, tokens, ctx, first, n_chunks, progress)
    nll, ref_nll, kl, agree = parts
    ppl, ppl_err = _ppl(nll)
    result = EvalResult(
        model=_spec(model).ref,
        reference=None if reference is None else _spec(reference).ref,
        text=text_name,
        ctx=ctx,
        chunks=n_chunks,
        tokens_scored=int(nll.size),
        perplexity=ppl,
        perplexity_err=ppl_err,
        offload=offload,
    )
    if ref_nll is None or kl is None or agree is None:
        return result
    return EvalResult(
        **{
            **asdict(result),
            "reference_perplexity": _ppl(ref_nll)[0],
            "mean_kl": float(kl.mean()),
            "median_kl": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)),
            "max_kl": float(kl.max()),
            "top1_agreement": float(agree.mean()),
        }
    )


@contextmanager
def _maybe_scorer(
    path: Path | ModelSpec | None, ctx: int, threads: int, gpu_layers: GpuLayers = 0
) -> Iterator[_Scorer | None]:
    if path is None:
        yield None
        return
    with _scorer(path, ctx, threads, gpu_layers=gpu_layers) as s:
        yield s


def _score_chunks(
    m: _Scorer,
    r: _Scorer | None,
    tokens: np.ndarray,
    ctx: int,
    first: int,
    n_chunks: int,
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    collected: list[tuple[np.ndarray, ...]] = []
    for c in range(n_chunks):
        chunk = tokens[c * ctx : (c + 1) * ctx].copy()
        if m.add_bos:
            chunk[0] = m.bos
        targets = chunk[first + 1 :].astype(np.int64)
        ref_logits = r.logits(chunk, first) if r is not None else None
        out = score_rows(m.logits(chunk, first), targets, ref_logits)
        collected.append(out)  # type: ignore[arg-type]
        if progress:
            progress(c + 1, n_chunks)
    nll = np.concatenate([c[0] for c in collected])
    if r is None:
        return nll, None, None, None
    return (nll, *(np.concatenate([c[i] for c in collected]) for i in (1, 2, 3)))  # type: ignore[return-value]
