"""Quantize a GGUF with llama.cpp's own quantizer, and choose a type that fits a memory budget.

llama.cpp reports everything it decides (each tensor's final type, row-length fallbacks,
failures) only through its log, so the quantizer runs with the log captured and parsed.
A dry run gives the exact per-tensor types, hence the exact size, in well under a second:
`--fit` dry-runs every candidate instead of guessing from nominal bits per weight.
Files in, files out: the vault side of the `quantize` verb is `freehold.adapt.quantize`.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as ll
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from freehold.engine.model import ensure_backend, physical_cores
from freehold.errors import FreeholdError, InvalidInput
from freehold.vault.gguf_meta import read_header, read_info

# Highest quality first. Only types that need no importance matrix.
QUANT_TYPES: dict[str, int] = {
    "F32": ll.LLAMA_FTYPE_ALL_F32,  # lossless unpacking, e.g. to check an adapter exactly
    "F16": ll.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": ll.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": ll.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q6_K": ll.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q5_K_M": ll.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q5_K_S": ll.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q5_1": ll.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q5_0": ll.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q4_K_M": ll.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_K_S": ll.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_1": ll.LLAMA_FTYPE_MOSTLY_Q4_1,
    "IQ4_NL": ll.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "IQ4_XS": ll.LLAMA_FTYPE_MOSTLY_IQ4_XS,
    "Q4_0": ll.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q3_K_L": ll.LLAMA_FTYPE_MOSTLY_Q3_K_L,
    "Q3_K_M": ll.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q3_K_S": ll.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "Q2_K": ll.LLAMA_FTYPE_MOSTLY_Q2_K,
}
UNQUANTIZED = {"F32", "F16", "BF16"}
KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16

# "[ 12/272] blk.0.attn_q.weight - [576, 576, 1, 1], type = q4_1, ..." then the final type as
# "converting to q5_0" (real run) or "-> 0.58 MiB (q5_0)" (dry run); absent when kept as is.
_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-.*?type =\s+(?P<src>\w+)")
_FINAL_TYPE = re.compile(r"converting to (\w+)|MiB \((\w+)\)\s*$")
_FALLBACK_LINE = re.compile(
    r"^warning: (?P<name>\S+)\s+- ncols\s+(?P<cols>\d+) not divisible by (?P<div>\d+) "
    r"\(required for type\s+(?P<want>\w+)\) -> falling back to\s+(?P<got>\w+)"
)


class QuantizeError(FreeholdError):
    """llama.cpp refused to quantize; the message carries its reason."""


@dataclass
class Fallback:
    tensor: str
    wanted: str
    used: str
    columns: int


@dataclass
class Plan:
    """What a quantization would produce, from llama.cpp's own dry run."""

    qtype: str
    size_bytes: int
    bits_per_weight: float
    fallbacks: list[Fallback] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)


# -- llama.cpp's log, captured ---------------------------------------------------------------

_log_lock = threading.Lock()
_captured: list[str] = []


@ll.llama_log_callback
def _capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    _captured.append(text.decode(errors="replace"))


@ll.llama_log_callback
def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines for the duration, then silence it again."""
    ensure_backend()
    with _log_lock:
        _captured.clear()
        ll.llama_log_set(_capture, ctypes.c_void_p(0))
        lines: list[str] = []
        try:
            yield lines
        finally:
            ll.llama_log_set(_silent, ctypes.c_void_p(0))
            lines.extend("".join(_captured).splitlines())
            _captured.clear()


def _run_quantizer(src: Path, dst: Path, qtype: str, dry_run: bool, threads: int) -> list[str]:
    params = ll.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.allow_requantize = True  # the caller decides; llama.cpp would only refuse
    params.nthread = threads
    params.dry_run = dry_run
    with _llama_log() as lines:
        rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        reason = next((ln for ln in lines if "failed" in ln or "error" in ln.lower()), "")
        raise QuantizeError(
            f"llama.cpp could not quantize {src.name} to {qtype} (code {rc}): "
            f"{reason.strip() or 'no reason given'}"
        )
    return lines


# -- planning --------------------------------------------------------------------------------


def check_type(qtype: str) -> str:
    name = qtype.upper()
    if name not in QUANT_TYPES:
        raise InvalidInput(
            f"unknown quantization type '{qtype}': choose one of {', '.join(QUANT_TYPES)} "
            "(types that need an importance matrix are not offered)"
        )
    return name


def _parse(lines: list[str], qtype: str, src: Path) -> Plan:
    _, tensors = read_header(src)
    elements = {t.name: t.n_elements for t in tensors}
    header_bytes = min(t.offset for t in tensors) if tensors else 0
    types: dict[str, str] = {}
    fallbacks = []
    for line in lines:
        if m := _TENSOR_LINE.match(line.strip()):
            final = _FINAL_TYPE.search(line)
            types[m["name"]] = (final[1] or final[2] if final else m["src"]).upper()
        elif m := _FALLBACK_LINE.match(line.strip()):
            fallbacks.append(
                Fallback(m["name"], m["want"].upper(), m["got"].upper(), int(m["cols"]))
            )
    total = header_bytes
    for name, n in elements.items():
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[types.get(name, "F32")]]
        total += -(-(n * size // block) // 32) * 32  # tensor data is 32-byte aligned
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    params = sum(elements.values())
    return Plan(qtype, total, round(8 * (total - header_bytes) / params, 3), fallbacks, counts)


def plan(src: Path, qtype: str, threads: int | None = None) -> Plan:
    """Exact size and fallbacks of quantizing `src` to `qtype`, without writing anything."""
    qtype = check_type(qtype)
    lines = _run_quantizer(src, Path("/dev/null"), qtype, True, threads or physical_cores())
    return _parse(lines, qtype, src)


def kv_cache_bytes(src: Path, ctx: int) -> int:
    """f16 K and V for every layer at `ctx` tokens (an upper bound for sliding-window models)."""
    meta, _ = read_header(src)
    arch = meta.get("general.architecture", "")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    embd = int(meta.get(f"{arch}.embedding_length", 0))
    k_len = int(meta.get(f"{arch}.attention.key_length", embd // max(heads, 1)))
    v_len = int(meta.get(f"{arch}.attention.value_length", k_len))
    return layers * ctx * kv_heads * (k_len + v_len) * KV_BYTES_PER_VALUE


@dataclass
class FitChoice:
    chosen: Plan | None
    kv_bytes: int
    budget_bytes: int
    candidates: list[Plan]

    def explain(self) -> str:
        kv = f"{self.kv_bytes / 2**20:.1f} MiB of KV cache"
        if self.chosen is None:
            smallest = self.candidates[-1]
            return (
                f"nothing fits {self.budget_bytes / 2**20:.1f} MiB: the smallest type, "
                f"{smallest.qtype}, needs {smallest.size_bytes / 2**20:.1f} MiB plus {kv}"
            )
        better = self.candidates[: self.candidates.index(self.chosen)]
        reason = (
            f"; the next better type, {better[-1].qtype}, needs "
            f"{(better[-1].size_bytes + self.kv_bytes) / 2**20:.1f} MiB"
            if better
            else "; it is the highest-quality type offered"
        )
        return (
            f"{self.chosen.qtype}: {self.chosen.size_bytes / 2**20:.1f} MiB file + {kv} = "
            f"{(self.chosen.size_bytes + self.kv_bytes) / 2**20:.1f} MiB within "
            f"{self.budget_bytes / 2**20:.1f} MiB{reason}"
        )


def choose_fit(src: Path, budget_bytes: int, ctx: int, threads: int | None = None) -> FitChoice:
    """The highest-quality type whose file plus KV cache for `ctx` fits the budget."""
    kv = kv_cache_bytes(src, ctx)
    candidates = [plan(src, t, threads) for t in QUANT_TYPES]
    # Quality order is the table's; a type that ends up larger than a better one is no use.
    fitting = [c for c in candidates if c.size_bytes + kv <= budget_bytes]
    return FitChoice(fitting[0] if fitting else None, kv, budget_bytes, candidates)


# -- doing it --------------------------------------------------------------------------------


@dataclass
class Quantized:
    path: Path
    source_quantization: str
    plan: Plan


def quantize(
    src: Path,
    dst: Path,
    qtype: str,
    allow_requantize: bool = False,
    threads: int | None = None,
    label: str | None = None,
) -> Quantized:
    """Write `dst`; refuse an already-quantized source unless the caller accepts the loss."""
    qtype = check_type(qtype)
    source = read_info(src)
    if source.quantization not in UNQUANTIZED and not allow_requantize:
        raise InvalidInput(
            f"{label or src.name} is already quantized ({source.quantization}); requantizing "
            "loses more than quantizing from 16-bit weights: pass --allow-requantize to do it "
            "anyway, or start from an F16/BF16 file"
        )
    lines = _run_quantizer(src, dst, qtype, False, threads or physical_cores())
    result = _parse(lines, qtype, src)
    result.size_bytes = dst.stat().st_size
    info = read_info(dst)
    result.bits_per_weight = info.bits_per_weight
    result.tensor_types = info.tensor_types
    return Quantized(dst, source.quantization, result)
