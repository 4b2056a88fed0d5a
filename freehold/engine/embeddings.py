"""Pooled embeddings from a separate llama.cpp context (embeddings=True) over the same weights.

The pooling is what the model declares (mean / CLS / last); causal LMs that declare none are
mean-pooled, which is the usual choice for them.
"""

from __future__ import annotations

import llama_cpp as ll
import numpy as np

from freehold.engine.batch import Batch
from freehold.engine.model import Model
from freehold.engine.types import ContextOverflow
from freehold.errors import InvalidInput

_MAX_SEQS = 8


class Embedder:
    """Not thread-safe: the Engine serialises calls with a lock."""

    def __init__(self, model: Model, *, n_ctx: int, n_threads: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        pooling = model.pooling_type()
        if pooling in (ll.LLAMA_POOLING_TYPE_NONE, ll.LLAMA_POOLING_TYPE_RANK):
            pooling = ll.LLAMA_POOLING_TYPE_MEAN
        self.pooling = {1: "mean", 2: "cls", 3: "last"}[pooling]
        p = ll.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_ctx
        p.n_ubatch = n_ctx
        p.n_seq_max = _MAX_SEQS
        p.kv_unified = True
        p.n_threads = n_threads
        p.n_threads_batch = n_threads
        p.embeddings = True
        p.pooling_type = pooling
        p.no_perf = True
        # Flash attention computes each query row alone, so a text's vector does not depend on
        # what else is in the batch (without it, ~1e-3 apart on AVX-512 CPUs).
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self._ctx = ll.llama_init_from_model(model.ptr, p)
        if not self._ctx:
            raise InvalidInput(f"could not create an embeddings context for {model.name}")
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = Batch(n_ctx)

    def embed(self, texts: list[str], *, normalize: bool = True) -> list[list[float]]:
        if not texts:
            raise InvalidInput("nothing to embed: send at least one text")
        token_lists = [self.model.tokenize(t, add_special=True) for t in texts]
        for i, toks in enumerate(token_lists):
            if not toks:
                raise InvalidInput(f"input {i} is empty; embeddings need some text")
            if len(toks) > self.n_ctx:
                raise ContextOverflow(
                    f"input {i} is {len(toks)} tokens but the embedding context holds "
                    f"{self.n_ctx}; shorten it"
                )
        out: list[list[float]] = []
        group: list[list[int]] = []
        for toks in token_lists:
            if group and (len(group) == _MAX_SEQS or sum(map(len, group)) + len(toks) > self.n_ctx):
                out.extend(self._run(group, normalize))
                group = []
            group.append(toks)
        out.extend(self._run(group, normalize))
        return out

    def _run(self, group: list[list[int]], normalize: bool) -> list[list[float]]:
        ll.llama_memory_clear(self._mem, True)
        b = self._batch
        b.clear()
        for seq, toks in enumerate(group):
            b.add_run(toks, 0, seq, False)
            b.logits[b.n - len(toks) : b.n] = 1  # pooling reads every token's output
        rc = ll.llama_decode(self._ctx, b.struct())
        if rc != 0:
            raise InvalidInput(f"embedding failed in llama.cpp (code {rc})")
        n_embd = ll.llama_model_n_embd_out(self.model.ptr) or self.model.n_embd
        vecs = []
        for seq in range(len(group)):
            ptr = ll.llama_get_embeddings_seq(self._ctx, seq)
            if not ptr:
                raise InvalidInput(f"{self.model.name} returned no pooled embedding")
            v = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
            if normalize:
                norm = np.linalg.norm(v)
                v = v / norm if norm > 0 else v
            vecs.append(v.tolist())
        return vecs

    def close(self) -> None:
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
