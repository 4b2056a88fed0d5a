"""The Engine: one llama.cpp context, N sequence slots, and a scheduler thread that owns them.

Continuous batching: between two decode steps requests are admitted into free slots and finished
ones leave. Every step decodes one token for each generating slot, then up to n_batch tokens of
the prompts still being prefilled (oldest first, equal chunks in one call), so requests that
arrive together start together and long prompts never stall streams for more than a chunk.
Callers only touch thread-safe structures: the admission deque (under a lock) and their
`RequestHandle`s.

Prefix reuse: each slot keeps the tokens whose KV it holds after its request ends. A new request
goes to the free slot sharing the longest prefix with it (least recently used among equals), and
when a longer prefix is held elsewhere (another slot, busy or not, or the host-memory
`PromptCache`) its KV is copied or restored into that slot: only the rest is computed. Before a
slot's conversation is overwritten it is saved to the `PromptCache`, so a conversation that
returns after its slot went to someone else restores its whole history instead of re-prefilling.

Batch invariance: with the defaults (flash attention, one KV stream per slot, decode and prompt
chunks in separate passes, fixed chunking) a greedy request gives the same tokens whatever runs
beside it. Two llama.cpp kernel choices remain outside our control: a prefix-cache hit changes
how the rest of the prompt is chunked, and a lone stream past ~256 tokens of context decodes
with a thread-split attention kernel when n_threads > 1; either can change low-order bits.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from freehold.engine.adapters import attach_lora
from freehold.engine.batch import Batch
from freehold.engine.devices import GpuLayers, OffloadPlan, loaded_plan, resolve_offload
from freehold.engine.front import EngineFront
from freehold.engine.model import (
    Model,
    available_ram_bytes,
    physical_cores,
    release_freed_memory,
)
from freehold.engine.prompt_cache import CachedState, PromptCache, state_buffer
from freehold.engine.sampling import Sampler, SamplingParams
from freehold.engine.stops import StopMatcher
from freehold.engine.types import (
    Delta,
    EngineClosed,
    EngineStats,
    Finished,
    FinishReason,
    Outbox,
    QueueFull,
    RequestHandle,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from freehold.errors import InvalidInput

log = logging.getLogger(__name__)

_ids = itertools.count(1)
# Copying another slot's KV is a whole-stream buffer copy, and saving or restoring a sequence's
# state a copy of its cells: a few ms, the price of computing a handful of prompt tokens
# (measured: 316 tokens of SmolLM2 save in 1.6 ms, restore in 1.8 ms). Below this many tokens,
# recomputing is as cheap.
_MIN_BORROW = 16
_KV_TYPES = {"f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0}
# llama.cpp's CPU flash attention runs a sequence's query rows through a tiled kernel from 64
# rows in one call, and one row at a time below that. Attending to a long cached prefix, the
# row kernel is far slower per row (measured here: ~14x the tiled kernel's cost per row and
# context token, where the tiled kernel costs about what the weights' flops do), so a short
# rest of a prompt after a long prefix is cheaper computed as 64 rows, a few cached ones again.
_FA_TILE = 64
_ROW_KERNEL_COST, _TILE_KERNEL_COST = 16.0, 1.2  # cost of an attention flop, in weight flops
_CLEARLY = 2.0  # the cost model is rough: recompute only when it at least halves the cost


@dataclass
class EngineConfig:
    """How to size and run one loaded model. `None` means: choose from the machine and model."""

    n_slots: int | None = None  # concurrent sequences; default from free RAM, at most 8
    n_ctx_per_slot: int | None = None  # tokens per sequence; default min(model ctx, 4096)
    n_threads: int | None = None  # default: physical cores
    n_batch: int = 512  # tokens per decode step (decode tokens + prefill chunk)
    max_queue: int = 64  # requests waiting for a slot before QueueFull
    # Flash attention computes each query row alone, so a sequence's numbers do not depend on
    # what else is in the batch (greedy output is batch-invariant); it is also faster here.
    flash_attn: bool = True
    kv_unified: bool = False  # one KV stream per slot: also needed for batch-invariant output
    kv_type: str = "f16"  # KV cache element type: "f16" or "q8_0"
    prefix_cache: bool = True
    adapters: tuple[str, ...] = ()  # LoRA GGUFs applied to every sequence (BASE+ADAPTER)
    ram_fraction: float = 0.25  # share of free RAM the KV cache may take when sizing slots
    # Jinja source used for chat instead of the model's own (`--chat-template`), e.g. so a base
    # model without a template can chat. Source text, not a name: resolved once by the caller.
    chat_template: str | None = None
    # Layers on the GPU: "auto" (as many as fit beside the KV cache), a count, or 0 (CPU only).
    # Resolved once, at load, by engine/devices.py; the engine's `offload` says what it chose.
    gpu_layers: GpuLayers = "auto"


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    matcher: StopMatcher
    max_new: int
    prompt_array: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    # scheduler state
    slot: int = -1
    pos: int = 0  # next prompt index to prefill
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    pending_token: int = -1  # sampled but not yet decoded
    out_idx: int = -1  # batch row holding this request's logits after the step
    admitted_at: float = 0.0
    first_token_at: float = 0.0


@dataclass
class _Slot:
    id: int
    tokens: list[int] = field(default_factory=list)  # exactly what the KV holds for seq `id`
    req: _Request | None = None
    last_used: float = 0.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int32) != np.asarray(b[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


class Engine(EngineFront):
    """Serve one model to many concurrent requests. Thread-safe; use from any thread or loop."""

    def __init__(
        self,
        model: str | os.PathLike[str] | Model,
        config: EngineConfig | None = None,
        *,
        name: str | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.config = cfg = config or EngineConfig()
        self._owns_model = not isinstance(model, Model)
        self.offload: OffloadPlan
        self.model = model if isinstance(model, Model) else self._load_model(Path(model), cfg)
        if not self._owns_model:
            self.offload = loaded_plan(self.model.gpu_layers, self.model.n_layer)
        self.name = name or self.model.path.stem
        self.n_threads = cfg.n_threads or physical_cores()
        try:
            self.n_ctx_per_slot = self._ctx_per_slot(cfg)
            self.n_slots = cfg.n_slots or self._default_slots(cfg)
            if not 1 <= self.n_slots <= ll.llama_max_parallel_sequences():
                raise InvalidInput(
                    f"n_slots must be between 1 and {ll.llama_max_parallel_sequences()}, "
                    f"got {self.n_slots}"
                )
            self._ctx = self._new_context(cfg)
        except BaseException:
            if self._owns_model:
                self.model.close()
            raise
        self._mem = ll.llama_get_memory(self._ctx)
        self._attention_flops = self.model.attention_flops_per_token()
        self._n_vocab = self.model.n_vocab
        self._batch = Batch(max(cfg.n_batch, self.n_slots))
        self._slots = [_Slot(i) for i in range(self.n_slots)]
        self._pending: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._outbox = Outbox()
        self._closed = False
        self.chat_template_override = cfg.chat_template
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self.last_active = time.monotonic()
        self._n_generated = 0
        self._n_prompt_computed = 0
        self._n_prompt_cached = 0
        self._compute_s = 0.0
        self._cache_hits = 0
        self._cache_misses = 0
        self._cache = prompt_cache if prompt_cache and prompt_cache.enabled else None
        if not cfg.prefix_cache:
            self._cache = None
        self.fingerprint = self._fingerprint(cfg)
        self._fatal: str | None = None
        # The scheduler re-takes the GIL after every llama_decode; with Python's default 5 ms
        # switch interval a busy server thread could hold it for most of a decode step.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    # -- sizing --------------------------------------------------------------------------------

    def _load_model(self, path: Path, cfg: EngineConfig) -> Model:
        """Decide the GPU offload for this model and these slots, then load the weights."""
        if not path.is_file():
            return Model(path)  # says NotFound in the vault's words
        self.offload = resolve_offload(
            cfg.gpu_layers,
            path,
            slots=cfg.n_slots,
            ctx_per_slot=cfg.n_ctx_per_slot,
            kv_type=cfg.kv_type,
            n_batch=cfg.n_batch,
        )
        model = Model(path, gpu_layers=self.offload.gpu_layers)
        if self.offload.n_layer != model.n_layer:  # a CPU-only plan never read the header
            self.offload = replace(self.offload, n_layer=model.n_layer)
        return model

    def _ctx_per_slot(self, cfg: EngineConfig) -> int:
        n = cfg.n_ctx_per_slot or min(self.model.n_ctx_train or 4096, 4096)
        if n < 16:
            raise InvalidInput(f"n_ctx_per_slot must be at least 16, got {n}")
        return -(-n // 256) * 256  # llama.cpp pads the KV cache to 256 cells anyway

    def _fingerprint(self, cfg: EngineConfig) -> str:
        """What a saved KV state depends on: the weights, the adapters and the KV layout."""
        files = [self.model.path, *map(Path, cfg.adapters)]
        ids = []
        for f in files:
            st = f.stat()
            ids.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join([*ids, cfg.kv_type, f"fa={cfg.flash_attn}"])

    def _default_slots(self, cfg: EngineConfig) -> int:
        per_slot = self.model.kv_bytes_per_token() * self.n_ctx_per_slot
        fit = int(available_ram_bytes() * cfg.ram_fraction) // max(per_slot, 1)
        return max(1, min(8, fit))

    def _new_context(self, cfg: EngineConfig) -> ll.llama_context_p:
        p = ll.llama_context_default_params()
        p.n_seq_max = self.n_slots
        p.n_ctx = self.n_ctx_per_slot * self.n_slots
        p.n_batch = max(cfg.n_batch, self.n_slots)
        p.n_ubatch = p.n_batch
        p.n_threads = self.n_threads
        p.n_threads_batch = self.n_threads
        p.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if cfg.flash_attn
            else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.kv_unified = cfg.kv_unified
        if cfg.kv_type not in _KV_TYPES:
            raise InvalidInput(f"kv_type must be one of {sorted(_KV_TYPES)}, got {cfg.kv_type!r}")
        p.type_k = p.type_v = _KV_TYPES[cfg.kv_type]
        p.swa_full = True  # lets prefix reuse trim a sequence's tail on sliding-window models
        p.no_perf = True
        p.embeddings = False
        ctx = ll.llama_init_from_model(self.model.ptr, p)
        if not ctx:
            raise InvalidInput(
                f"could not create a context of {p.n_ctx} tokens for {self.name}; "
                "lower n_slots or n_ctx_per_slot"
            )
        try:
            attach_lora(self.model.ptr, ctx, cfg.adapters, self.model.path.name)
        except BaseException:
            ll.llama_free(ctx)
            raise
        return ctx

    # -- public API ----------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        add_special: bool = True,
    ) -> RequestHandle:
        """Queue a completion; returns at once. Raises InvalidInput/ContextOverflow/QueueFull."""
        if self._closed or self._fatal:
            raise EngineClosed(f"model {self.name} is not running ({self._fatal or 'closed'})")
        tokens, params = self._prepare(prompt, params, add_special)
        room = self.n_ctx_per_slot - len(tokens)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        handle = RequestHandle(next(_ids), self._wake, self._outbox)
        sampler = Sampler(self.model, params, params.resolved_seed())
        handle.seed = sampler.seed
        handle.prompt_tokens = len(tokens)
        req = _Request(
            handle,
            tokens,
            params,
            sampler,
            StopMatcher(params.stop),
            max_new,
            np.asarray(tokens, dtype=np.int32),
        )
        with self._lock:
            if len(self._pending) >= self.config.max_queue:
                sampler.close()
                raise QueueFull(
                    f"model {self.name} already has {len(self._pending)} requests waiting "
                    f"(max_queue={self.config.max_queue}); retry shortly"
                )
            self._pending.append(req)
            self.last_active = time.monotonic()
        self._wake.set()
        return handle

    def embed(self, texts: list[str], *, normalize: bool = True) -> list[list[float]]:
        """One pooled embedding per text (a separate embeddings context, made on first use)."""
        from freehold.engine.embeddings import Embedder

        with self._embed_lock:
            if self._embedder is None:
                self._embedder = Embedder(
                    self.model, n_ctx=self.n_ctx_per_slot, n_threads=self.n_threads
                )
            self.last_active = time.monotonic()
            return self._embedder.embed(texts, normalize=normalize)

    def stats(self) -> EngineStats:
        with self._lock:
            queued = len(self._pending)
            running = sum(1 for s in self._slots if s.req is not None)
        return EngineStats(
            model=self.name,
            slots=self.n_slots,
            running=running,
            queued=queued,
            max_queue=self.config.max_queue,
            n_ctx_per_slot=self.n_ctx_per_slot,
            tokens_generated=self._n_generated,
            prompt_tokens_computed=self._n_prompt_computed,
            prompt_tokens_cached=self._n_prompt_cached,
            prompt_cache_hits=self._cache_hits,
            prompt_cache_misses=self._cache_misses,
            compute_seconds=self._compute_s,
        )

    def resident_bytes(self) -> int:
        """Memory the model holds: weights plus every slot's KV cache."""
        kv = self.model.kv_bytes_per_token() * self.n_ctx_per_slot * self.n_slots
        return self.model.info().size_bytes + kv

    @property
    def busy(self) -> bool:
        st = self.stats()
        return st.running + st.queued > 0

    def close(self) -> None:
        """Stop the scheduler (pending and running requests finish with an error) and free all."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=300)
            if self._thread.is_alive():  # stuck in llama.cpp: leak the context, never free it
                return  # under a running decode
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._owns_model:
            self.model.close()
        release_freed_memory()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduler thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed:
                self._admit()
                self._drop_cancelled()
                self._compact()
                if not any(s.req for s in self._slots):
                    self._outbox.flush()
                    self._wake.wait(timeout=0.25)
                    self._wake.clear()
                    continue
                self._step()
        except Exception as e:  # a bug or a llama.cpp failure: fail everyone loudly, not hang
            log.exception("engine %s scheduler crashed", self.name)
            self._fatal = f"scheduler error: {type(e).__name__}: {e}"
        finally:
            self._fail_all(self._fatal or "the model was unloaded")
            self._outbox.flush()

    def _fail_all(self, why: str) -> None:
        for s in self._slots:
            if s.req is not None:
                self._finish(s, "error", error=why)
        with self._lock:
            pending, self._pending = list(self._pending), collections.deque()
        for r in pending:
            r.sampler.close()
            r.handle._push(Finished("error", Usage(len(r.prompt), 0, 0), _no_timings(), why))

    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if s.req is None]
            if not free:
                return
            # Pop and place under the lock so stats() never sees a request in neither state.
            with self._lock:
                if not self._pending or self._worth_waiting(self._pending[0]):
                    return
                req = self._pending.popleft()
                if not req.handle.cancelled:
                    self._place(req, free)
                    continue
            req.sampler.close()
            req.handle._push(
                Finished(
                    "cancelled", Usage(len(req.prompt), 0, 0), _timings(req, time.perf_counter())
                )
            )

    def _worth_waiting(self, req: _Request) -> bool:
        """True while another slot is still prefilling a long prefix this request shares.

        Requests that arrive together with the same long system prompt would otherwise each
        compute it; holding this one for a few steps lets it copy the KV instead.
        """
        if not self.config.prefix_cache or req.handle.cancelled:
            return False
        have = max((_common_prefix(s.tokens, req.prompt) for s in self._slots), default=0)
        if self._cache is not None:
            have = max(have, self._cache.longest(self.fingerprint, req.prompt_array))
        for s in self._slots:
            r = s.req
            if r is not None and r.pos < len(r.prompt):
                shared = min(_common_prefix(r.prompt, req.prompt), len(req.prompt) - 1)
                if shared >= have + _MIN_BORROW and r.pos < shared:
                    return True
        return False

    def _place(self, req: _Request, free: list[_Slot]) -> None:
        """Put `req` in the free slot sharing the longest prefix, least recently used among
        equals; bring in a longer prefix from elsewhere; save what the slot held first."""
        if self.config.prefix_cache:
            slot = max(
                self._contiguous(free),
                key=lambda s: (_common_prefix(s.tokens, req.prompt), -s.last_used),
            )
            keep = _common_prefix(slot.tokens, req.prompt)
            self._save(slot, keep)
            keep = self._fetch_prefix(slot, req, keep)
            keep = self._compute_from(min(keep, len(req.prompt) - 1), len(req.prompt))
        else:
            slot, keep = self._contiguous(free)[0], 0
        keep = self._trim(slot, keep)
        req.slot, req.pos, req.cached = slot.id, keep, keep
        req.admitted_at = time.perf_counter()
        slot.req = req
        self._n_prompt_cached += keep

    def _compute_from(self, keep: int, n: int) -> int:
        """Where to start computing an `n`-token prompt whose first `keep` are held.

        From `keep`, unless the rest is under a flash-attention tile and computing a whole
        tile (recomputing some held tokens) costs clearly less on the CPU: see `_FA_TILE`.
        """
        rest = n - keep
        if not self.config.flash_attn or self.offload.active or rest >= _FA_TILE or n <= _FA_TILE:
            return keep
        weights, attention = 2 * self.model.n_params, self._attention_flops
        by_rows = rest * (weights + n * attention * _ROW_KERNEL_COST)
        as_tile = _FA_TILE * (weights + n * attention * _TILE_KERNEL_COST)
        return n - _FA_TILE if as_tile * _CLEARLY < by_rows else keep

    def _trim(self, slot: _Slot, keep: int) -> int:
        """Drop the slot's KV past `keep` tokens; returns what it still holds."""
        if keep < len(slot.tokens):
            if not ll.llama_memory_seq_rm(self._mem, slot.id, keep, -1):
                ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
                keep = 0
            del slot.tokens[keep:]
        return keep

    def _contiguous(self, free: list[_Slot]) -> list[_Slot]:
        """The free slots that keep the running sequence ids contiguous.

        llama.cpp batches per-sequence KV streams together only for consecutive sequence ids; a
        gap splits a step into several passes and loses the batching gain. A prefix held by a
        slot outside this set is still reused, by copying it (see `_fetch_prefix`).
        """
        busy = [s.id for s in self._slots if s.req is not None]
        if not busy:
            return free
        lo, hi = min(busy), max(busy)
        holes = [s for s in free if lo < s.id < hi]
        edges = [s for s in free if s.id in (lo - 1, hi + 1)]
        return holes or edges or free

    def _save(self, slot: _Slot, keep: int) -> None:
        """Save the slot's sequence to the prompt cache before all but `keep` tokens are lost.

        Skipped when little would be lost, or when another slot or cache entry holds it all.
        """
        n = len(slot.tokens)
        if self._cache is None or n - keep < _MIN_BORROW:
            return
        if any(
            s is not slot and len(s.tokens) >= n and _common_prefix(s.tokens, slot.tokens) == n
            for s in self._slots
        ):
            return
        tokens = np.asarray(slot.tokens, dtype=np.int32)
        if self._cache.covers(self.fingerprint, tokens):
            return
        size = ll.llama_state_seq_get_size(self._ctx, slot.id)
        state = state_buffer(size)
        if ll.llama_state_seq_get_data(self._ctx, state, size, slot.id) == size:
            self._cache.put(self.fingerprint, tokens, state)

    def _fetch_prefix(self, slot: _Slot, req: _Request, keep: int) -> int:
        """Bring a longer prefix of `req`'s prompt into `slot` than the `keep` tokens it has.

        From another slot (even a busy one), by copying its KV stream, or from the prompt
        cache, by restoring a saved state; whichever holds more. Returns the prefix now held.
        """
        donor, donor_len = None, keep
        for s in self._slots:
            if s is not slot:
                n = _common_prefix(s.tokens, req.prompt)
                if n > donor_len:
                    donor, donor_len = s, n
        saved, saved_len = None, 0
        if self._cache is not None:
            saved, saved_len = self._cache.best(self.fingerprint, req.prompt_array)
        if saved is not None and saved_len > donor_len and saved_len >= keep + _MIN_BORROW:
            self._cache_hits += 1
            return self._restore(slot, saved, saved_len)
        if self._cache is not None:
            self._cache_misses += 1
        if donor is None or donor_len < keep + _MIN_BORROW:
            return keep
        ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        ll.llama_memory_seq_cp(self._mem, donor.id, slot.id, -1, -1)
        slot.tokens = list(donor.tokens)
        return donor_len

    def _restore(self, slot: _Slot, saved: CachedState, shared: int) -> int:
        """Load a saved sequence state into `slot`; on failure the slot is left empty."""
        assert self._cache is not None
        ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        slot.tokens = []
        if ll.llama_state_seq_set_data(self._ctx, saved.state, len(saved.state), slot.id) == 0:
            log.warning("engine %s: a saved prompt state did not restore; recomputing", self.name)
            ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
            self._cache.discard(saved)
            return 0
        slot.tokens = saved.tokens.tolist()
        return shared

    def _compact(self) -> None:
        """Close a gap among running slots by moving the last one into it (a KV stream copy).

        Only when nobody waits (a waiting request would fill the gap anyway). The gap's
        conversation is saved to the prompt cache first; the moved request's numbers are
        unchanged.
        """
        busy = [s for s in self._slots if s.req is not None]
        if len(busy) < 2 or busy[-1].id - busy[0].id + 1 == len(busy) or self._pending:
            return
        hole = next(s for s in self._slots[busy[0].id :] if s.req is None)
        src = busy[-1]
        self._save(hole, 0)
        ll.llama_memory_seq_rm(self._mem, hole.id, -1, -1)
        ll.llama_memory_seq_cp(self._mem, src.id, hole.id, -1, -1)
        ll.llama_memory_seq_rm(self._mem, src.id, -1, -1)
        with self._lock:  # stats() must not count the moving request twice
            hole.tokens, src.tokens = src.tokens, []
            hole.req, src.req = src.req, None
        hole.req.slot = hole.id  # type: ignore[union-attr]

    def _drop_cancelled(self) -> None:
        for s in self._slots:
            if s.req is not None and s.req.handle.cancelled:
                self._finish(s, "cancelled")

    def _step(self) -> None:
        """One scheduling step: a decode pass for every generating stream, then prompt chunks.

        Decode rows and prompt chunks never share a `llama_decode` call, and a prompt is always
        cut into the same chunks (n_batch tokens from where its cache ends): llama.cpp picks its
        attention kernel by the rows per sequence in a call, so this keeps every request's
        numbers independent of what else is running (greedy output is batch-invariant).
        """
        live = [s for s in self._slots if s.req is not None]
        decoding = [s for s in live if s.req is not None and s.req.pending_token >= 0]
        if decoding:
            self._decode_pass(decoding)
        prefilling = [s for s in live if s.req is not None and s.req.pos < len(s.req.prompt)]
        for group in self._prefill_groups(prefilling):
            self._prefill_pass(group)

    def _chunk_len(self, r: _Request) -> int:
        return min(len(r.prompt) - r.pos, self._batch.capacity)

    def _prefill_groups(self, prefilling: list[_Slot]) -> list[list[_Slot]]:
        """This step's prompt chunks: oldest request first, n_batch tokens in all.

        Chunks of equal length share one call, so that when 8 requests arrive together they all
        start in the same step. llama.cpp splits a multi-sequence call into equal rows per
        sequence, so only equal chunks keep each prompt's rows per call what they are alone.
        """
        budget = self._batch.capacity
        groups: dict[int, list[_Slot]] = {}
        for s in sorted(prefilling, key=lambda s: s.req.admitted_at):  # type: ignore[union-attr]
            n = self._chunk_len(s.req)  # type: ignore[arg-type]
            if n <= budget:
                groups.setdefault(n, []).append(s)
                budget -= n
        # Ascending ids: llama.cpp batches consecutive sequence ids into one pass.
        return [sorted(g, key=lambda s: s.id) for g in groups.values()]

    def _decode_pass(self, slots: list[_Slot]) -> None:
        b = self._batch
        b.clear()
        for s in slots:
            r = s.req
            assert r is not None
            r.out_idx = b.add(r.pending_token, len(s.tokens), s.id, True)
            s.tokens.append(r.pending_token)
            r.pending_token = -1
        self._run_batch(slots, sample=slots)

    def _prefill_pass(self, slots: list[_Slot]) -> None:
        b = self._batch
        b.clear()
        finishing: list[_Slot] = []
        for s in slots:
            r = s.req
            assert r is not None
            chunk = r.prompt[r.pos : r.pos + self._chunk_len(r)]
            done = r.pos + len(chunk) == len(r.prompt)
            r.out_idx = b.add_run(chunk, len(s.tokens), s.id, done)
            s.tokens.extend(chunk)
            r.pos += len(chunk)
            self._n_prompt_computed += len(chunk)
            if done:
                finishing.append(s)
        self._run_batch(slots, sample=finishing)

    def _run_batch(self, slots: list[_Slot], sample: list[_Slot]) -> None:
        """Decode the filled batch, pick the next token of `sample`, hand out the events."""
        t0 = time.perf_counter()
        rc = ll.llama_decode(self._ctx, self._batch.struct())
        self._compute_s += time.perf_counter() - t0
        if rc != 0:
            self._decode_failed(slots, rc)
        else:
            now = time.perf_counter()
            for s in sample:
                if s.req is not None:
                    self._on_token(s, s.req, now)
        self._outbox.flush()

    def _decode_failed(self, live: list[_Slot], rc: int) -> None:
        why = "the KV cache is full" if rc == 1 else f"llama_decode failed with code {rc}"
        for s in live:
            ll.llama_memory_seq_rm(self._mem, s.id, -1, -1)
            s.tokens.clear()
            self._finish(s, "error", error=why)

    def _on_token(self, s: _Slot, r: _Request, now: float) -> None:
        tok = r.sampler.sample(self._ctx, r.out_idx)
        if not r.generated:
            r.first_token_at = now
        r.generated.append(tok)
        self._n_generated += 1
        lps = (self._logprobs(r, tok),) if r.params.logprobs else ()
        if self.model.is_eog(tok) and not r.params.ignore_eos:
            if lps:
                r.handle._push(Delta("", (tok,), lps))
            self._finish(s, "stop")
            return
        text = r.matcher.feed(self.model.piece(tok))
        r.handle._push(Delta(text, (tok,), lps))
        if r.matcher.stopped:
            self._finish(s, "stop")
        elif len(r.generated) >= r.max_new or len(s.tokens) >= self.n_ctx_per_slot:
            self._finish(s, "length")
        else:
            r.pending_token = tok

    def _logprobs(self, r: _Request, tok: int) -> TokenLogprob:
        """Log-probabilities under the model's raw distribution (before sampling filters)."""
        ptr = ll.llama_get_logits_ith(self._ctx, r.out_idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
        m = logits.max()
        lse = m + np.log(np.exp(logits - m).sum())
        top: tuple[TopLogprob, ...] = ()
        k = r.params.top_logprobs
        if k:
            ids = np.argpartition(-logits, k)[:k]
            ids = ids[np.argsort(-logits[ids])]
            top = tuple(
                TopLogprob(int(i), self.model.detokenize([int(i)]), float(logits[i] - lse))
                for i in ids
            )
        return TokenLogprob(tok, self.model.detokenize([tok]), float(logits[tok] - lse), top)

    def _finish(self, s: _Slot, reason: FinishReason, *, error: str | None = None) -> None:
        r = s.req
        assert r is not None
        s.req = None
        s.last_used = time.monotonic()
        self.last_active = s.last_used
        if r.pending_token >= 0:
            r.pending_token = -1
        if reason != "cancelled":
            rest = r.matcher.flush()
            if rest:
                r.handle._push(Delta(rest, ()))
        r.sampler.close()
        if not self.config.prefix_cache:
            ll.llama_memory_seq_rm(self._mem, s.id, -1, -1)
            s.tokens.clear()
        now = time.perf_counter()
        usage = Usage(len(r.prompt), len(r.generated), r.cached)
        r.handle._push(Finished(reason, usage, _timings(r, now), error, r.matcher.matched))


def _no_timings() -> Timings:
    return Timings(0.0, 0.0, 0.0, 0.0, 0.0)


def _timings(r: _Request, now: float) -> Timings:
    t0 = r.handle.submitted_at
    admitted = r.admitted_at or now
    first = r.first_token_at or now
    computed = len(r.prompt) - r.cached
    prefill_s = max(first - admitted, 1e-9)
    decode_s = now - first
    n_dec = max(len(r.generated) - 1, 0)
    return Timings(
        queued_s=admitted - t0,
        ttft_s=first - t0,
        total_s=now - t0,
        prefill_tokens_per_s=computed / prefill_s if r.first_token_at else 0.0,
        decode_tokens_per_s=n_dec / decode_s if n_dec and decode_s > 0 else 0.0,
    )
