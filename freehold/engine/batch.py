"""A reusable `llama_batch` whose arrays are numpy buffers, so filling it is cheap.

Each token belongs to exactly one sequence; `seq_id[i]` points at `seq[i]`.
"""

from __future__ import annotations

import ctypes

import llama_cpp as ll
import numpy as np


class Batch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        i32p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (i32p * capacity)(
            *[ctypes.cast(base + 4 * i, i32p) for i in range(capacity)]
        )
        self._struct = ll.llama_batch()
        self._struct.token = self.token.ctypes.data_as(i32p)
        self._struct.embd = ctypes.POINTER(ctypes.c_float)()
        self._struct.pos = self.pos.ctypes.data_as(i32p)
        self._struct.n_seq_id = self.n_seq.ctypes.data_as(i32p)
        self._struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32p))
        self._struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    @property
    def free(self) -> int:
        return self.capacity - self.n

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        """Append one token; return its index (the output row when `output`)."""
        i = self.n
        self.token[i] = token
        self.pos[i] = pos
        self.seq[i] = seq
        self.logits[i] = output
        self.n = i + 1
        return i

    def add_run(self, tokens: list[int], start_pos: int, seq: int, output_last: bool) -> int:
        """Append consecutive tokens of one sequence; return the index of the last one."""
        i, k = self.n, len(tokens)
        self.token[i : i + k] = tokens
        self.pos[i : i + k] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self.seq[i : i + k] = seq
        self.logits[i : i + k] = 0
        if output_last:
            self.logits[i + k - 1] = 1
        self.n = i + k
        return i + k - 1

    def struct(self) -> ll.llama_batch:
        self._struct.n_tokens = self.n
        return self._struct
