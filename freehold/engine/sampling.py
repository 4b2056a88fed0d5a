"""Per-request sampling parameters and the native llama.cpp sampler chain built from them.

Sampling runs in C (one chain per slot); Python only picks which output row to sample from.
Plain greedy requests (no grammar, no penalties, no finite logit bias) skip the chain: the
argmax of the logits row is the token llama.cpp's greedy sampler picks, without copying the
whole vocabulary into its candidate array for every token.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as ll
import numpy as np

from freehold.engine import grammar as _grammar
from freehold.engine.model import Model
from freehold.errors import InvalidInput


@dataclass
class SamplingParams:
    """How to pick tokens. `temperature <= 0` is greedy (argmax), deterministic by construction.

    Defaults follow llama.cpp's server. Penalties apply to generated tokens only (OpenAI
    semantics). `seed=None` draws a fresh seed; a fixed seed reproduces the output, also when
    the request is batched beside others.
    """

    max_tokens: int | None = 256  # None: until the end of the context
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    # Constrained output: at most one of these.
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None  # raw GBNF, root rule "root"

    def validate(self) -> SamplingParams:
        """Raise InvalidInput naming the bad field; return self for chaining."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInput(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidInput(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise InvalidInput(
                f"repeat_penalty must be > 0 (1 disables it), got {self.repeat_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise InvalidInput(f"{name} must be in [-2, 2], got {v}")
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidInput(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**32 - 1:
            raise InvalidInput(f"seed must be in [0, 2^32-2], got {self.seed}")
        if sum([self.json_mode, self.json_schema is not None, self.grammar is not None]) > 1:
            raise InvalidInput("use only one of json_mode, json_schema and grammar")
        if len(self.stop) > 16:
            raise InvalidInput(f"at most 16 stop strings, got {len(self.stop)}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def constrained(self) -> bool:
        """Output must follow a grammar (JSON mode, a JSON schema or raw GBNF)."""
        return self.json_mode or self.json_schema is not None or self.grammar is not None

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else secrets.randbelow(2**32 - 1)


class Sampler:
    """How one request picks its tokens: a native sampler chain, or for plain greedy requests
    the argmax of the logits row. Free it when the request ends."""

    def __init__(self, model: Model, params: SamplingParams, seed: int) -> None:
        self.seed = seed
        self._n_vocab = model.n_vocab
        bias = _bias(model, params)
        self._banned = _argmax_bans(params, bias)
        self._ptr: ll.llama_sampler_p | None = None
        if self._banned is None:
            cp = ll.llama_sampler_chain_default_params()
            cp.no_perf = True
            self._ptr = ll.llama_sampler_chain_init(cp)
            try:
                for s in _links(model, params, bias, seed):
                    ll.llama_sampler_chain_add(self._ptr, s)
            except Exception:
                self.close()
                raise

    @property
    def native(self) -> bool:
        """True when llama.cpp's sampler chain picks the tokens."""
        return self._banned is None

    def sample(self, ctx: ll.llama_context_p, idx: int) -> int:
        """Sample from output row `idx` of the last decode and accept the token into the chain."""
        if self._banned is not None:
            return _argmax(ctx, idx, self._n_vocab, self._banned)
        return ll.llama_sampler_sample(self._ptr, ctx, idx)

    def close(self) -> None:
        if self._ptr:
            ll.llama_sampler_free(self._ptr)
            self._ptr = None


def _bias(model: Model, p: SamplingParams) -> dict[int, float]:
    """The request's logit bias, with `ignore_eos` banning every end token; ids checked."""
    bias = {int(t): float(b) for t, b in p.logit_bias.items()}
    if p.ignore_eos:
        bias.update(dict.fromkeys(model.eog_tokens(), -math.inf))
    for tok in bias:
        if not 0 <= tok < model.n_vocab:
            raise InvalidInput(
                f"logit_bias token {tok} is outside the vocabulary 0..{model.n_vocab - 1}"
            )
    return bias


def _argmax_bans(p: SamplingParams, bias: dict[int, float]) -> np.ndarray | None:
    """The tokens a plain greedy request may never pick, or None when it needs the chain.

    The chain is stateless for such a request (bias, then greedy), so skipping it loses nothing.
    """
    if not p.greedy or p.constrained:
        return None
    if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        return None
    if any(b != -math.inf for b in bias.values()):
        return None
    return np.array(sorted(bias), dtype=np.int64)


def _argmax(ctx: ll.llama_context_p, idx: int, n_vocab: int, banned: np.ndarray) -> int:
    """The first highest logit of row `idx`, banned tokens excluded (llama.cpp's greedy rule)."""
    ptr = ll.llama_get_logits_ith(ctx, idx)
    if not ptr:
        raise RuntimeError(f"llama.cpp has no logits for batch row {idx}")
    row = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
    tok = int(row.argmax())
    if banned.size and tok in banned:
        masked = row.copy()
        masked[banned] = -np.inf
        tok = int(masked.argmax())
    return tok


def _links(
    model: Model, p: SamplingParams, bias: dict[int, float], seed: int
) -> list[ll.llama_sampler_p]:
    """The chain, in llama.cpp's usual order: bias, grammar, penalties, truncation, temp, pick."""
    links: list[ll.llama_sampler_p] = []
    if bias:
        arr = (ll.llama_logit_bias * len(bias))()
        for i, (tok, b) in enumerate(bias.items()):
            arr[i].token = tok
            arr[i].bias = b
        links.append(ll.llama_sampler_init_logit_bias(model.n_vocab, len(bias), arr))
    gbnf = _grammar.gbnf_for(p)
    if gbnf is not None:
        g = ll.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
        if not g:
            raise InvalidInput(
                "the grammar could not be parsed by llama.cpp; check its GBNF syntax"
            )
        links.append(g)
    if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
        links.append(
            ll.llama_sampler_init_penalties(
                model.n_vocab,
                p.penalty_last_n,
                p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            )
        )
    if p.greedy:
        links.append(ll.llama_sampler_init_greedy())
        return links
    if p.top_k > 0:
        links.append(ll.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        links.append(ll.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0.0:
        links.append(ll.llama_sampler_init_min_p(p.min_p, 1))
    links.append(ll.llama_sampler_init_temp(p.temperature))
    links.append(ll.llama_sampler_init_dist(seed))
    return links


def logit_bias_from_strings(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings)."""
    out: dict[int, float] = {}
    for k, v in (bias or {}).items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError):
            raise InvalidInput(f"logit_bias key {k!r} is not a token id") from None
    return out
