"""Read what the vault catalogs from a GGUF file's header, and check the file is whole.

A header is untrusted input. Every count, length and offset in it is checked against the
bytes left in the file before it is used, and the checks are those of llama.cpp's own
reader (`ggml/src/gguf.cpp`): a header the vault accepts is one llama.cpp can open, and a
damaged one is refused in one line instead of crashing a parser or the engine later.
`read_info` also refuses the few values llama.cpp does not refuse but aborts the whole
process on (a token twice in the vocabulary, a layer count out of range, head counts that
do not divide): fuzzing found them, and the engine runs this check before every load.

This scan rather than `gguf.GGUFReader`, by measurement (BENCHMARKS.md, bench_vault): the
library builds numpy views for every vocabulary entry, which makes it 80-110x slower on the
packaged models, and it trusts lengths, counts and offsets (on 210 damaged SmolLM2 headers
it raised IndexError on 59 and accepted 8 whose tensors overlap). The scan walks the header
once, keeps scalar values and short arrays, counts long arrays without building them, and
takes tensor sizes from the `gguf` package's own type tables.
"""

from __future__ import annotations

import os
import re
import struct
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from freehold.errors import InvalidInput

KEEP_ARRAY_MAX = 64  # arrays longer than this (vocabularies, merges) are counted, not kept
VOCABULARY = "tokenizer.ggml.tokens"

# llama.cpp's limits (ggml.h, gguf.cpp): a header past them is one llama.cpp refuses.
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name must be shorter, to leave room for its NUL
MAX_ITEMS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS, and GGUF_MAX_STRING_LENGTH in bytes
INT64_MAX = (1 << 63) - 1  # dimensions and element counts are int64 in ggml
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
ROPE_SCALING = {"none", "linear", "yarn", "longrope"}  # any other name trips an assert

# GGUF value type → struct format of a scalar (the test mutators write with the same table)
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_U64 = struct.Struct("<Q")
_PRINT_WORDS = 4  # vocabulary fingerprints cover a token's length and first 32 bytes
_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit multiplier (the golden ratio's), for mixing
_CHUNK = 1 << 20  # read-ahead for walking vocabularies
_ITEM_BYTES = {t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()} | {GGUFValueType.STRING: 8}
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a one-byte key, type tag, a one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset
# Architecture names become catalog keys ("{arch}.context_length") and are printed as-is.
_ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class TensorInfo:
    name: str
    type: str
    n_elements: int
    n_bytes: int
    offset: int  # absolute, in the file


@dataclass
class GGUFInfo:
    """The facts the catalog keeps about one GGUF file."""

    architecture: str
    parameters: int
    quantization: str
    bits_per_weight: float
    context_length: int | None
    layers: int | None
    embedding_length: int | None
    vocab_size: int | None
    has_chat_template: bool
    file_type: str  # "model" or "adapter"
    name: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    size_label: str | None = None
    organization: str | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(seen: dict[bytes, int], token: bytes, k: int, h: _Header, what: str) -> None:
    """Note vocabulary entry `k`; refuse a repeat. llama.cpp names an empty entry
    "[EMPTY_k]", so that is the text compared."""
    token = token or b"[EMPTY_%d]" % k
    if seen.setdefault(token, k) != k:
        shown = token[:40].decode("utf-8", errors="replace")
        raise h.fail(f"{what} holds the token {shown!r} twice, as ids {seen[token]} and {k}")


@dataclass(frozen=True)
class _Counted:
    """A long array we measured but did not keep."""

    length: int


def _corrupt(path: Path, detail: str) -> str:
    return f"{path} has a corrupted GGUF header ({detail}); the file is damaged: fetch it again"


def _truncated(path: Path, size: int) -> str:
    return (
        f"{path} is truncated: its {size} bytes end inside the GGUF header; "
        "the copy is incomplete: fetch the file again"
    )


class _Header:
    """A forward-only cursor over a GGUF header that never reads, skips or keeps past the
    file's end: every length is checked against the bytes left before it is used."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.pos = 0

    def fail(self, detail: str) -> InvalidInput:
        return InvalidInput(_corrupt(self.path, detail))

    def claim(self, n: int, what: str, at_least: bool = False) -> None:
        """Refuse a length that runs past the end before acting on it. A short download
        and a damaged length look the same from here, so the message names both."""
        if n > self.size - self.pos:
            least = "at least " if at_least else ""
            raise InvalidInput(
                f"{self.path} is truncated or has a corrupted GGUF header ({what} claims "
                f"{least}{n} bytes from offset {self.pos}, past the file's end at "
                f"{self.size}); fetch the file again"
            )

    def read(self, n: int) -> bytes:
        data = self.f.read(n) if n <= self.size - self.pos else b""
        if len(data) != n:  # also when the file shrank under us
            raise InvalidInput(_truncated(self.path, self.size))
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.claim(n, what)
        self.f.seek(n, 1)
        self.pos += n

    def skip_strings(self, n: int, what: str, distinct: bool = False) -> None:
        """Step over `n` length-prefixed strings (a vocabulary's worth) inside chunks read
        ahead, one `unpack_from` per string. `distinct`: refuse a string seen before, since
        llama.cpp aborts the process on a vocabulary that holds a token twice."""
        size, unpack_from = self.size, _U64.unpack_from
        starts = array("q")  # where each string's text begins, when `distinct`
        note = starts.append if distinct else None
        base, buf, i = self.pos, b"", 0  # buf[i] is the byte at file offset base + i
        for _ in range(n):
            if i + 8 > len(buf):
                base, buf, i = self._refill(base + i, 8)
            (length,) = unpack_from(buf, i)
            i += 8
            if length > size - (base + i) or length > MAX_ITEMS:
                self.pos = base + i
                self.claim(length, f"a string in {what}")
                raise self.fail(f"a string in {what} claims {length} bytes")
            if note:
                note(base + i)
            i += length
        self.pos = base + i
        if starts:
            self._distinct(starts, what)
        self.f.seek(self.pos)

    def _distinct(self, starts: array, what: str) -> None:
        """The strings that begin at `starts` (each ending where the next one's length
        prefix begins) all differ. Each gets a 64-bit fingerprint of its length and first
        32 bytes, computed with numpy; only strings whose fingerprints meet are compared
        in full, so the check costs a few vectorised passes, not a Python set of slices."""
        first = starts[0]
        self.f.seek(first)
        region = self.f.read(self.pos - first)
        begin = np.frombuffer(starts, dtype=np.int64) - first
        end = np.append(begin[1:] - 8, len(region))
        lengths = end - begin
        padded = region + bytes(8 * _PRINT_WORDS)
        words = np.ndarray((len(padded) - 7,), dtype="<u8", buffer=padded, strides=(1,))
        prints = lengths.astype(np.uint64) * np.uint64(_MIX)
        for k in range(_PRINT_WORDS):
            left = np.clip(lengths - 8 * k, 0, 8).astype(np.uint64)
            mask = np.where(left == 8, ~np.uint64(0), (np.uint64(1) << (left * 8)) - 1)
            prints = (prints ^ (words[begin + 8 * k] & mask)) * np.uint64(_MIX)
            prints ^= prints >> np.uint64(29)
        ordered = np.sort(prints)
        empties = bool((lengths == 0).any())
        if not empties and not (ordered[1:] == ordered[:-1]).any():
            return
        if empties:  # llama.cpp renames them "[EMPTY_k]", which could meet any token
            suspects = set(range(len(begin)))
        else:
            met = np.flatnonzero(np.isin(prints, ordered[1:][ordered[1:] == ordered[:-1]]))
            suspects = set(met.tolist())
        seen: dict[bytes, int] = {}
        for k in sorted(suspects):
            _first(seen, region[begin[k] : end[k]], k, self, what)

    def _refill(self, at: int, need: int) -> tuple[int, bytes, int]:
        self.f.seek(at)
        buf = self.f.read(max(_CHUNK, need))
        if len(buf) < need:
            raise InvalidInput(_truncated(self.path, self.size))
        return at, buf, 0

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def raw_string(self, what: str) -> bytes:
        n = self.unpack("<Q")
        if n > MAX_ITEMS:
            raise self.fail(f"{what} claims {n} bytes")
        self.claim(n, what)
        return self.read(n)

    def string(self, what: str = "a string") -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.unpack("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, distinct: bool = False) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, distinct)
        return self.unpack(SCALAR_FORMATS[vtype])

    def array(self, what: str, distinct: bool = False) -> Any:
        itype = self.value_type(what)
        if itype == GGUFValueType.ARRAY:  # llama.cpp refuses nested arrays; so do we
            raise self.fail(f"{what} is an array of arrays")
        n = self.unpack("<Q")
        if n > MAX_ITEMS:
            raise self.fail(f"{what} claims {n} items")
        self.claim(n * _ITEM_BYTES[itype], f"{what}, an array of {n} items,")
        distinct = distinct and itype == GGUFValueType.STRING
        if n <= KEEP_ARRAY_MAX:
            if distinct:
                tokens = [self.raw_string(what) for _ in range(n)]
                seen: dict[bytes, int] = {}
                for k, token in enumerate(tokens):
                    _first(seen, token, k, self, what)
                return [t.decode("utf-8", errors="replace") for t in tokens]
            return [self.value(itype, what) for _ in range(n)]
        if itype == GGUFValueType.STRING:
            self.skip_strings(n, what, distinct)
        else:
            self.skip(n * _ITEM_BYTES[itype], what)
        return _Counted(n)


def check_magic(path: Path, label: str | None = None) -> None:
    """Fail fast, before copying anything, when a file is plainly not GGUF."""
    with _open(Path(path)) as f:
        magic = f.read(4)
    if magic != struct.pack("<I", gguf.GGUF_MAGIC):
        raise InvalidInput(_not_gguf(label or str(path), magic))


def _not_gguf(label: str, magic: bytes) -> str:
    return (
        f"{label} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
        "Freehold stores GGUF weights: convert it with llama.cpp first"
    )


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise InvalidInput(f"{path} does not exist: check the path") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path} is a directory, not a GGUF file") from None
    except OSError as e:
        raise InvalidInput(f"{path} cannot be read ({e.strerror}): check its permissions") from None


def read_header(path: Path, label: str | None = None) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata key/values and tensor table of a GGUF file, checked against the file size.

    `label` names the file in errors when `path` is a staged copy of it.
    """
    path = Path(path)
    shown = Path(label) if label else path
    with _open(path) as f:
        h = _Header(f, shown, os.fstat(f.fileno()).st_size)
        magic = f.read(4)
        if magic != struct.pack("<I", gguf.GGUF_MAGIC):
            raise InvalidInput(_not_gguf(str(shown), magic))
        h.pos = 4
        version = h.unpack("<I")
        if version not in (2, 3):
            raise h.fail(f"version {version}, expected 2 or 3")
        n_tensors, n_kv = h.unpack("<Q"), h.unpack("<Q")
        table = n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KV_BYTES
        h.claim(table, f"a table of {n_tensors} tensors and {n_kv} keys", at_least=True)
        meta, types = _key_values(h, n_kv)
        alignment = _alignment(h, meta, types)
        tensors = _tensor_table(h, n_tensors, alignment)
    _check_complete(shown, tensors, h.size)
    return meta, tensors


def _key_values(h: _Header, n_kv: int) -> tuple[dict[str, Any], dict[str, GGUFValueType]]:
    meta: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    seen: set[bytes] = set()  # raw bytes: two keys may differ only in invalid UTF-8
    for i in range(n_kv):
        raw = h.raw_string(f"key #{i}")
        if not raw:
            raise h.fail(f"key #{i} is empty")
        if raw in seen:
            raise h.fail(f"key {raw.decode('utf-8', 'replace')!r} appears twice")
        seen.add(raw)
        key = raw.decode("utf-8", errors="replace")
        vtype = h.value_type(f"key {key!r}")
        meta[key] = h.value(vtype, f"key {key!r}", distinct=key == VOCABULARY)
        types[key] = vtype
    return meta, types


def _alignment(h: _Header, meta: dict[str, Any], types: dict[str, GGUFValueType]) -> int:
    if "general.alignment" not in meta:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    value = meta["general.alignment"]
    if types["general.alignment"] != GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
        raise h.fail(f"general.alignment is {value!r}, not a power of two as a uint32")
    return value


def _tensor_table(h: _Header, n_tensors: int, alignment: int) -> list[TensorInfo]:
    """Tensor entries, each checked as llama.cpp checks it: name, shape, type, and an offset
    exactly where the previous tensor's padded data ends (so no two overlap)."""
    entries: list[tuple[str, int, GGMLQuantizationType, int]] = []
    names: set[bytes] = set()
    expected = 0  # where the next tensor's data must start, relative to the data section
    for i in range(n_tensors):
        raw = h.raw_string(f"the name of tensor #{i}")
        name = raw.decode("utf-8", errors="replace")
        if len(raw) >= MAX_NAME:
            raise h.fail(f"tensor #{i} has a {len(raw)}-byte name, the limit is {MAX_NAME - 1}")
        if raw in names:
            raise h.fail(f"tensor {name!r} appears twice")
        names.add(raw)
        dims, n_elements = _shape(h, name)
        qtype, n_bytes = _tensor_type(h, name, dims, n_elements)
        offset = h.unpack("<Q")
        if offset != expected:
            raise h.fail(f"tensor {name!r} claims data offset {offset}, expected {expected}")
        entries.append((name, n_elements, qtype, n_bytes))
        expected += -(-n_bytes // alignment) * alignment
    data_start = -(-h.pos // alignment) * alignment
    tensors, offset = [], data_start
    for name, n_elements, qtype, n_bytes in entries:
        tensors.append(TensorInfo(name, qtype.name, n_elements, n_bytes, offset))
        offset += -(-n_bytes // alignment) * alignment
    return tensors


def _shape(h: _Header, name: str) -> tuple[list[int], int]:
    """A tensor's dimensions and element count, refused where ggml's int64 would overflow."""
    n_dims = h.unpack("<I")
    if n_dims > MAX_DIMS:
        raise h.fail(f"tensor {name!r} has {n_dims} dimensions, the limit is {MAX_DIMS}")
    dims = [h.unpack("<Q") for _ in range(n_dims)]
    n = 1
    for d in dims:
        n *= d
        if d > INT64_MAX or n > INT64_MAX:
            raise h.fail(f"tensor {name!r} has shape {dims}, too large for int64")
    return dims, n


def _tensor_type(
    h: _Header, name: str, dims: list[int], n: int
) -> tuple[GGMLQuantizationType, int]:
    """A tensor's type and byte size; rows must hold whole blocks of that type, as in ggml."""
    raw = h.unpack("<I")
    try:
        qtype = GGMLQuantizationType(raw)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise h.fail(f"tensor {name!r} has unknown type {raw}") from None
    row = dims[0] if dims else 1
    if row % block:
        raise h.fail(f"tensor {name!r} has rows of {row}, not whole {qtype.name} blocks")
    return qtype, n // block * type_size


def _check_complete(path: Path, tensors: list[TensorInfo], size: int) -> None:
    if not tensors:
        return
    end = max(t.offset + t.n_bytes for t in tensors)
    if end > size:
        raise InvalidInput(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
            "the copy is incomplete: fetch the file again"
        )


def quantization_name(meta: dict[str, Any], tensors: list[TensorInfo]) -> str:
    """The file's declared type (general.file_type), else its dominant tensor type."""
    ft = meta.get("general.file_type")
    if isinstance(ft, int):
        try:
            return LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    by_bytes: dict[str, int] = {}
    for t in tensors:
        by_bytes[t.type] = by_bytes.get(t.type, 0) + t.n_bytes
    return max(by_bytes, key=by_bytes.__getitem__) if by_bytes else "unknown"


def _text(path: Path, meta: dict[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is None or isinstance(value, str):
        return value
    raise InvalidInput(_corrupt(path, f"{key} holds {_kind(value)}, not a string"))


def _count(path: Path, meta: dict[str, Any], key: str) -> int | None:
    """A catalogued count: llama.cpp reads these as uint32, so nothing else is accepted."""
    value = meta.get(key)
    if value is None:
        return None
    if _is_int(value) and 0 <= value < 1 << 32:
        return value
    raise InvalidInput(_corrupt(path, f"{key} holds {_kind(value)}, not a count"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, list | _Counted):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    return f"the {type(value).__name__} {value!r}"


def _architecture(path: Path, meta: dict[str, Any]) -> str:
    arch = _text(path, meta, "general.architecture")
    if arch is None:
        return "unknown"
    if not _ARCH_NAME.fullmatch(arch):
        raise InvalidInput(_corrupt(path, f"general.architecture {arch[:80]!r} is not a name"))
    return arch


def _vocab_size(path: Path, meta: dict[str, Any], arch: str) -> int | None:
    declared = _count(path, meta, f"{arch}.vocab_size")
    if declared:
        return declared
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    if isinstance(tokens, _Counted):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens) or None
    raise InvalidInput(_corrupt(path, f"tokenizer.ggml.tokens holds {_kind(tokens)}, not an array"))


def _loadable(path: Path, meta: dict[str, Any], arch: str) -> None:
    """Refuse the header values on which llama.cpp aborts the whole process (GGML_ASSERTs in
    `llama_model_base::load_hparams`, for every architecture) instead of failing the load."""

    def number(key: str) -> int | None:  # a wrong type is refused by llama.cpp, cleanly
        v = meta.get(f"{arch}.{key}")
        return v if _is_int(v) else None

    def refuse(detail: str) -> InvalidInput:
        return InvalidInput(_corrupt(path, f"{detail}, on which llama.cpp would abort"))

    layers = number("block_count")
    if layers is not None and not 0 < layers <= MAX_LAYERS:
        raise refuse(f"{arch}.block_count is {layers}, outside 1..{MAX_LAYERS}")
    nextn = number("nextn_predict_layers")
    if nextn is not None and layers is not None and nextn > layers:
        raise refuse(f"{arch}.nextn_predict_layers is {nextn}, more than {layers} layers")
    used = meta.get(f"{arch}.expert_used_count")  # one count, or one per layer
    counts = [u for u in (used if isinstance(used, list) else [used]) if _is_int(u)]
    used_max = max(counts or [0])
    experts = number("expert_count") or 0
    groups, group_used = number("expert_group_count") or 0, number("expert_group_used_count")
    if experts > MAX_EXPERTS or used_max > experts or (experts and not used_max):
        raise refuse(f"{arch} has {experts} experts and uses {used_max}")
    if groups and not (groups < experts and experts % groups == 0):
        raise refuse(f"{arch} has {experts} experts in {groups} groups")
    if groups > 1 and not 0 < (group_used or 0) < groups:
        raise refuse(f"{arch} uses {group_used} of {groups} expert groups")
    _attention(meta, arch, refuse)
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, str) and scaling not in ROPE_SCALING:
        raise refuse(f"{arch}.rope.scaling.type is {scaling[:40]!r}")


def _attention(meta: dict[str, Any], arch: str, refuse: Callable[[str], InvalidInput]) -> None:
    """Attention shapes llama.cpp takes on trust: a head count that does not divide, or a
    head size whose product wraps around uint32, slips past its tensor-shape checks and
    trips an assert when the first batch runs (found by fuzzing the packaged models)."""

    def per_layer(key: str) -> list[int]:
        v = meta.get(f"{arch}.attention.{key}")
        return [x for x in (v if isinstance(v, list) else [v]) if _is_int(x)]

    heads = per_layer("head_count")
    kv_heads = per_layer("head_count_kv") or heads
    if len(heads) == 1:
        heads = heads * len(kv_heads)
    if len(kv_heads) == 1:
        kv_heads = kv_heads * len(heads)
    for h, kv in zip(heads, kv_heads, strict=False):
        if kv > h or (kv and h % kv):
            raise refuse(f"{arch} has {h} attention heads and {kv} key/value heads")
    most = max(heads or [0])
    for key in ("key_length", "value_length"):
        size = meta.get(f"{arch}.attention.{key}")
        if _is_int(size) and size * most >= 1 << 32:
            raise refuse(f"{arch}.attention.{key} is {size} for {most} heads, past uint32")


def read_info(path: Path, label: str | None = None) -> GGUFInfo:
    """Parse and check a GGUF file; raise InvalidInput saying what is wrong if it is not sound.

    Beyond the header's structure, the keys the catalog keeps must hold the types
    llama.cpp reads them as: a name that is a number, or a count that is a string, is damage.
    """
    path = Path(path)
    meta, tensors = read_header(path, label)
    shown = Path(label) if label else path
    arch = _architecture(shown, meta)
    _loadable(shown, meta, arch)
    params = sum(t.n_elements for t in tensors)
    n_bytes = sum(t.n_bytes for t in tensors)
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.type] = counts.get(t.type, 0) + 1
    _count(shown, meta, "general.file_type")
    return GGUFInfo(
        architecture=arch,
        parameters=params,
        quantization=quantization_name(meta, tensors),
        bits_per_weight=round(8 * n_bytes / params, 3) if params else 0.0,
        context_length=_count(shown, meta, f"{arch}.context_length"),
        layers=_count(shown, meta, f"{arch}.block_count"),
        embedding_length=_count(shown, meta, f"{arch}.embedding_length"),
        vocab_size=_vocab_size(shown, meta, arch),
        has_chat_template=_text(shown, meta, "tokenizer.chat_template") is not None,
        file_type=_text(shown, meta, "general.type") or "model",
        name=_text(shown, meta, "general.name"),
        license=_text(shown, meta, "general.license"),
        license_name=_text(shown, meta, "general.license.name"),
        license_link=_text(shown, meta, "general.license.link"),
        size_label=_text(shown, meta, "general.size_label"),
        organization=_text(shown, meta, "general.organization"),
        tensor_types=counts,
    )


def chat_template_source(path: Path) -> str | None:
    """The GGUF's own chat template (None for a base model), read from its header alone."""
    source = read_header(path)[0].get("tokenizer.chat_template")
    return source if isinstance(source, str) else None
