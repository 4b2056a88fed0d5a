"""Finished conversations' KV state in host memory, so a returning one is restored, not recomputed.

An engine has a few slots; a server has many conversations. When a slot is about to be reused,
the scheduler saves the sequence it holds (llama.cpp's per-sequence state: the KV cells and
their positions) here, keyed by the exact tokens. A later prompt that starts with those tokens
restores the state into a slot and computes only the rest.

One cache serves every engine of a server under one byte budget, least-recently-used first.
Each entry is tagged with its engine's fingerprint (weights, adapters, KV layout): KV computed
by other weights is garbage for this model, so an entry is only ever offered to an engine with
the same fingerprint.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from freehold.engine.model import available_ram_bytes

# Without a --cache-ram, a share of the RAM free at start, capped like llama-server's 8 GiB.
_DEFAULT_SHARE = 0.15
_DEFAULT_CAP = 8 << 30


def default_budget_bytes() -> int:
    return min(_DEFAULT_CAP, int(available_ram_bytes() * _DEFAULT_SHARE))


@dataclass(frozen=True)
class CacheStats:
    budget_bytes: int
    bytes: int
    entries: int
    saved: int
    evictions: int


@dataclass
class CachedState:
    """One saved sequence: the tokens its KV holds and llama.cpp's serialized state."""

    fingerprint: str
    tokens: np.ndarray  # int32
    state: ctypes.Array[ctypes.c_uint8]
    last_used: float

    @property
    def nbytes(self) -> int:
        return len(self.state) + self.tokens.nbytes


def state_buffer(size: int) -> ctypes.Array[ctypes.c_uint8]:
    """A zeroed buffer for one saved state, in its own anonymous mapping.

    States are megabytes and churn under the budget; from malloc they would fragment the heap
    and the server's memory would only grow. A mapping goes back to the OS when the entry is
    dropped (the ctypes array keeps the mapping alive until then).
    """
    return (ctypes.c_uint8 * size).from_buffer(mmap.mmap(-1, max(size, 1)))


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int32 token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PromptCache:
    """Thread-safe LRU of saved sequence states under a byte budget, shared by engines."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget_bytes = default_budget_bytes() if budget_bytes is None else budget_bytes
        if self.budget_bytes < 0:
            raise ValueError("the prompt cache budget cannot be negative")
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, CachedState] = OrderedDict()  # oldest use first
        self._ids = itertools.count()
        self._bytes = 0
        self._saved = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def covers(self, fingerprint: str, tokens: np.ndarray) -> bool:
        """True when an entry already holds all of `tokens` (saving them again adds nothing)."""
        with self._lock:
            return any(
                e.fingerprint == fingerprint
                and len(e.tokens) >= len(tokens)
                and common_prefix(e.tokens, tokens) == len(tokens)
                for e in self._entries.values()
            )

    def put(
        self, fingerprint: str, tokens: np.ndarray, state: ctypes.Array[ctypes.c_uint8]
    ) -> bool:
        """Keep `state`, evicting least-recently-used entries to fit. False if it cannot fit.

        Entries of the same engine whose tokens are a prefix of `tokens` are dropped: the new
        entry restores everything they could.
        """
        entry = CachedState(fingerprint, tokens, state, time.monotonic())
        if entry.nbytes > self.budget_bytes:
            return False
        with self._lock:
            for key, e in list(self._entries.items()):
                if (
                    e.fingerprint == fingerprint
                    and len(e.tokens) <= len(tokens)
                    and common_prefix(e.tokens, tokens) == len(e.tokens)
                ):
                    self._drop(key)
            while self._bytes + entry.nbytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
            self._entries[next(self._ids)] = entry
            self._bytes += entry.nbytes
            self._saved += 1
        return True

    def longest(self, fingerprint: str, prompt: np.ndarray) -> int:
        """How many tokens of `prompt` the best entry of this engine holds (a peek)."""
        with self._lock:
            return max(
                (
                    common_prefix(e.tokens, prompt)
                    for e in self._entries.values()
                    if e.fingerprint == fingerprint
                ),
                default=0,
            )

    def best(self, fingerprint: str, prompt: np.ndarray) -> tuple[CachedState | None, int]:
        """The entry of this engine sharing the longest prefix with `prompt`, and that length.

        The entry counts as used (it moves to the back of the LRU order).
        """
        with self._lock:
            best_key, best_len = None, 0
            for key, e in self._entries.items():
                if e.fingerprint == fingerprint:
                    n = common_prefix(e.tokens, prompt)
                    if n > best_len:
                        best_key, best_len = key, n
            if best_key is None:
                return None, 0
            entry = self._entries[best_key]
            self._entries.move_to_end(best_key)
            entry.last_used = time.monotonic()
            return entry, best_len

    def discard(self, entry: CachedState) -> None:
        """Forget an entry that failed to restore."""
        with self._lock:
            for key, e in list(self._entries.items()):
                if e is entry:
                    self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self.budget_bytes, self._bytes, len(self._entries), self._saved, self._evictions
            )

    def _drop(self, key: int) -> None:
        self._bytes -= self._entries.pop(key).nbytes
