"""Load a GGUF model through llama.cpp's low-level API: tokenize, detokenize, model facts.

`Model` owns the weights (read-only, shareable between contexts and threads). Contexts are
created by the scheduler and the embedder from it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as ll

from freehold.errors import InvalidInput, NotFound

_backend_lock = threading.Lock()
_backend_ready = False


@ll.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty on stderr; Freehold reports its own errors. Nothing is printed, so no
    # prompt text can leak through llama.cpp's debug logs either.
    return None


def ensure_backend() -> None:
    """Initialise llama.cpp once per process and silence its logging."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            ll.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _backend_ready = True


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (where llama.cpp 0.3.36's AMX matmul crashes)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_int8" in flags or " amx_tile" in flags


def load_params(
    *, use_mmap: bool = True, vocab_only: bool = False, gpu_layers: int = 0
) -> ll.llama_model_params:
    """How every Freehold model load asks llama.cpp for weights.

    `gpu_layers` is llama.cpp's n_gpu_layers, already resolved (see engine/devices.py): 0 keeps
    everything on the CPU (llama.cpp's own default, -1, would offload all it can).
    """
    params = ll.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    params.use_mmap = use_mmap
    params.vocab_only = vocab_only
    # llama.cpp 0.3.36's AMX matmul (an "extra buffer type") crashes on multi-token batches on
    # CPUs with AMX (seen on Sapphire Rapids Xeons, SIGSEGV in ggml_backend_amx_mul_mat). Elsewhere
    # the extra types are the weight repacks that speed up Q4_0/Q4_K/Q8_0, so keep them there.
    params.use_extra_bufts = not cpu_has_amx()
    return params


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[str] = set()
    for cpu in allowed:
        sib = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(sib.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo; a conservative 4 GiB when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc only; elsewhere nothing to do).

    An unloaded model's buffers and the prompt cache's evicted states are freed into malloc's
    arenas, which glibc keeps: without this a server that loads and unloads models grows.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that callers (server, CLI) may want to show."""

    path: str
    name: str
    arch: str
    n_params: int
    size_bytes: int
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    n_layer: int
    has_chat_template: bool
    pooling: str


class Model:
    """A loaded GGUF model: weights, vocabulary, tokenizer and metadata."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        use_mmap: bool = True,
        gpu_layers: int = 0,
        vocab_only: bool = False,
    ) -> None:
        """`vocab_only`: the tokenizer and metadata without the weights (a gateway's view of a
        model whose replicas run elsewhere)."""
        p = Path(path)
        if not p.is_file():
            raise NotFound(f"model file {p} does not exist; check the path or the vault name")
        from freehold.vault.gguf_meta import read_info

        read_info(p)  # llama.cpp aborts the process on some damaged headers: refuse them first
        ensure_backend()
        params = load_params(use_mmap=use_mmap, gpu_layers=gpu_layers, vocab_only=vocab_only)
        ptr = ll.llama_model_load_from_file(str(p).encode(), params)
        if not ptr and gpu_layers:
            raise InvalidInput(
                f"{p} could not be loaded with {gpu_layers} layers on the GPU (out of device "
                "memory?); try a smaller --gpu-layers, or 0"
            )
        if not ptr:
            raise InvalidInput(f"{p} could not be loaded as a GGUF model; is it a valid .gguf?")
        self._ptr = ptr
        self.path = p
        self.gpu_layers = gpu_layers
        self.vocab = ll.llama_model_get_vocab(ptr)
        self.n_vocab: int = ll.llama_vocab_n_tokens(self.vocab)
        self.vocab_only = vocab_only
        # Without weights llama.cpp leaves the hyperparameters unset: read them from the header.
        self.n_ctx_train: int = self._hparam("context_length", ll.llama_model_n_ctx_train)
        self.n_embd: int = self._hparam("embedding_length", ll.llama_model_n_embd)
        self.n_layer: int = self._hparam("block_count", ll.llama_model_n_layer)
        self.n_head: int = self._hparam("attention.head_count", ll.llama_model_n_head) or 1
        self.n_head_kv: int = (
            self._hparam("attention.head_count_kv", ll.llama_model_n_head_kv) or self.n_head
        )
        self.n_params: int = ll.llama_model_n_params(ptr)
        self.add_bos: bool = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos_id: int = ll.llama_vocab_bos(self.vocab)
        self.eos_id: int = ll.llama_vocab_eos(self.vocab)
        self._piece_cache: dict[int, bytes] = {}
        self._eog_cache: dict[int, bool] = {}
        self._eog_list: list[int] | None = None

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def ptr(self) -> ll.llama_model_p:
        if self._ptr is None:
            raise RuntimeError("model is closed")
        return self._ptr

    def close(self) -> None:
        if self._ptr is not None:
            ll.llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:  # best effort; engines close explicitly
        try:
            self.close()
        except Exception:
            pass

    # -- metadata ------------------------------------------------------------------------------

    def _hparam(self, key: str, loaded: Any) -> int:
        if not self.vocab_only:
            return int(loaded(self.ptr))
        value = self.meta(f"{self.arch}.{key}") or "0"
        return int(value) if value.isdigit() else 0  # per-layer arrays: unknown here

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        buf = ctypes.create_string_buffer(4096)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @property
    def arch(self) -> str:
        return self.meta("general.architecture") or "unknown"

    @property
    def name(self) -> str:
        return self.meta("general.name") or self.path.stem

    def chat_template(self) -> str | None:
        raw = ll.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def pooling_type(self) -> int:
        """The pooling the model declares (LLAMA_POOLING_TYPE_*), NONE when it declares none."""
        v = self.meta(f"{self.arch}.pooling_type")
        return int(v) if v and v.lstrip("-").isdigit() else ll.LLAMA_POOLING_TYPE_NONE

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 KV cache one token takes across all layers (for slot sizing)."""
        k_len, v_len = self._head_lengths()
        return self.n_layer * self.n_head_kv * (k_len + v_len) * 2

    def _head_lengths(self) -> tuple[int, int]:
        arch, n_head = self.arch, self.n_head
        k_len = int(self.meta(f"{arch}.attention.key_length") or self.n_embd // n_head)
        v_len = int(self.meta(f"{arch}.attention.value_length") or self.n_embd // n_head)
        return k_len, v_len

    def attention_flops_per_token(self) -> int:
        """Attention work of one query row per token of context it attends to (all layers)."""
        k_len, v_len = self._head_lengths()
        return 2 * self.n_layer * self.n_head * (k_len + v_len)

    def info(self) -> ModelInfo:
        pooling = {1: "mean", 2: "cls", 3: "last", 4: "rank"}.get(self.pooling_type(), "none")
        return ModelInfo(
            path=str(self.path),
            name=self.name,
            arch=self.arch,
            n_params=self.n_params,
            size_bytes=ll.llama_model_size(self.ptr),
            n_ctx_train=self.n_ctx_train,
            n_vocab=self.n_vocab,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            has_chat_template=self.chat_template() is not None,
            pooling=pooling,
        )

    # -- tokens --------------------------------------------------------------------------------

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Text to token ids. `add_special` adds BOS when the model wants one."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            arr = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, parse_special)
            if n < 0:
                raise InvalidInput("the prompt could not be tokenized; check its encoding")
        return list(arr[:n])

    def piece(self, token: int) -> bytes:
        """The bytes one token renders to (control tokens render empty). Cached per token."""
        cached = self._piece_cache.get(token)
        if cached is not None:
            return cached
        # A fresh buffer per miss: the scheduler and callers' threads may both detokenize.
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        out = buf.raw[:n]
        self._piece_cache[token] = out
        return out

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        v = self._eog_cache.get(token)
        if v is None:
            v = bool(ll.llama_vocab_is_eog(self.vocab, token))
            self._eog_cache[token] = v
        return v

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token id (EOS, EOT, <|im_end|>, ...), computed once."""
        if self._eog_list is None:
            self._eog_list = [
                t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(self.vocab, t)
            ]
        return self._eog_list

    def token_text(self, token: int) -> str:
        """The vocabulary text of a token, special tokens included (for templates)."""
        if token < 0:
            return ""
        raw = ll.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""
