"""Read what the vault catalogs from a GGUF file's header, and check the file is whole.

`gguf.GGUFReader` materialises every vocabulary entry as numpy views (about 5 s for
SmolLM2's 49k tokens, far more for Gemma's 262k), which would dominate an import. This scan
walks the header once, keeps scalar values and short arrays, counts long arrays without
building them, and uses the `gguf` package's own type tables for tensor sizes.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from freehold.errors import InvalidInput

KEEP_ARRAY_MAX = 64  # arrays longer than this (vocabularies, merges) are counted, not kept

_SCALARS: dict[GGUFValueType, str] = {
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


class _Header:
    """A forward-only reader over a GGUF header that fails with a clear message."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise InvalidInput(
                f"{self.path} is truncated: its {self.size} bytes end inside the GGUF header; "
                "the copy is incomplete: fetch the file again"
            )
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise InvalidInput(_corrupt(self.path, f"a string claims {n} bytes"))
        return self.read(n).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        self.f.seek(n, 1)

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        raise InvalidInput(_corrupt(self.path, f"unknown value type {int(vtype)}"))

    def array(self) -> Any:
        itype = _value_type(self.path, self.unpack("<I"))
        n = self.unpack("<Q")
        if n > self.size:
            raise InvalidInput(_corrupt(self.path, f"an array claims {n} items"))
        if n <= KEEP_ARRAY_MAX:
            return [self.value(itype) for _ in range(n)]
        if itype in _SCALARS:
            self.skip(n * struct.calcsize(_SCALARS[itype]))
        elif itype == GGUFValueType.STRING:
            for _ in range(n):
                self.skip(self.unpack("<Q"))
        else:
            for _ in range(n):
                self.value(itype)
        return _Counted(n)


@dataclass(frozen=True)
class _Counted:
    """A long array we measured but did not keep."""

    length: int


def _corrupt(path: Path, detail: str) -> str:
    return f"{path} has a corrupted GGUF header ({detail}); the file is damaged: fetch it again"


def _value_type(path: Path, raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise InvalidInput(_corrupt(path, f"unknown value type {raw}")) from None


def check_magic(path: Path, label: str | None = None) -> None:
    """Fail fast, before copying anything, when a file is plainly not GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != struct.pack("<I", gguf.GGUF_MAGIC):
        raise InvalidInput(_not_gguf(label or str(path), magic))


def _not_gguf(label: str, magic: bytes) -> str:
    return (
        f"{label} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
        "Freehold stores GGUF weights: convert it with llama.cpp first"
    )


def read_header(path: Path, label: str | None = None) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata key/values and tensor table of a GGUF file, checked against the file size.

    `label` names the file in errors when `path` is a staged copy of it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise InvalidInput(f"{path} does not exist: check the path") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path} is a directory, not a GGUF file") from None
    shown = Path(label) if label else path
    with f:
        h = _Header(f, shown, size)
        magic = f.read(4)
        if magic != struct.pack("<I", gguf.GGUF_MAGIC):
            raise InvalidInput(_not_gguf(str(shown), magic))
        version = h.unpack("<I")
        if version not in (2, 3):
            raise InvalidInput(_corrupt(shown, f"version {version}, expected 2 or 3"))
        n_tensors, n_kv = h.unpack("<Q"), h.unpack("<Q")
        if n_tensors > size or n_kv > size:
            raise InvalidInput(_corrupt(shown, f"{n_tensors} tensors and {n_kv} keys"))
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            meta[key] = h.value(_value_type(shown, h.unpack("<I")))
        raw_tensors = [_tensor_entry(h) for _ in range(n_tensors)]
        alignment = int(meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-f.tell() // alignment) * alignment
    tensors = [_tensor_info(shown, t, data_start) for t in raw_tensors]
    _check_complete(shown, tensors, size)
    return meta, tensors


def _tensor_entry(h: _Header) -> tuple[str, list[int], int, int]:
    name = h.string()
    n_dims = h.unpack("<I")
    if n_dims > 8:
        raise InvalidInput(_corrupt(h.path, f"tensor {name!r} has {n_dims} dimensions"))
    dims = [h.unpack("<Q") for _ in range(n_dims)]
    return name, dims, h.unpack("<I"), h.unpack("<Q")


def _tensor_info(path: Path, entry: tuple[str, list[int], int, int], start: int) -> TensorInfo:
    name, dims, raw_type, offset = entry
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise InvalidInput(_corrupt(path, f"tensor {name!r} has unknown type {raw_type}")) from None
    n = 1
    for d in dims:
        n *= d
    return TensorInfo(name, qtype.name, n, n * type_size // block, start + offset)


def _check_complete(path: Path, tensors: list[TensorInfo], size: int) -> None:
    if not tensors:
        return
    end = max(t.offset + t.n_bytes for t in tensors)
    if end > size:
        raise InvalidInput(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
            "the copy is incomplete: fetch the file again"
        )


def _int(meta: dict[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return int(v) if isinstance(v, int | float) else None


def _length(v: Any) -> int | None:
    if isinstance(v, _Counted):
        return v.length
    return len(v) if isinstance(v, list) else None


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


def read_info(path: Path, label: str | None = None) -> GGUFInfo:
    """Parse and check a GGUF file; raise InvalidInput saying what is wrong if it is not sound."""
    meta, tensors = read_header(path, label)
    arch = str(meta.get("general.architecture", "unknown"))
    params = sum(t.n_elements for t in tensors)
    n_bytes = sum(t.n_bytes for t in tensors)
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.type] = counts.get(t.type, 0) + 1
    vocab = _int(meta, f"{arch}.vocab_size") or _length(meta.get("tokenizer.ggml.tokens"))
    return GGUFInfo(
        architecture=arch,
        parameters=params,
        quantization=quantization_name(meta, tensors),
        bits_per_weight=round(8 * n_bytes / params, 3) if params else 0.0,
        context_length=_int(meta, f"{arch}.context_length"),
        layers=_int(meta, f"{arch}.block_count"),
        embedding_length=_int(meta, f"{arch}.embedding_length"),
        vocab_size=vocab,
        has_chat_template=isinstance(meta.get("tokenizer.chat_template"), str),
        file_type=str(meta.get("general.type", "model")),
        name=meta.get("general.name"),
        license=meta.get("general.license"),
        license_name=meta.get("general.license.name"),
        license_link=meta.get("general.license.link"),
        size_label=meta.get("general.size_label"),
        organization=meta.get("general.organization"),
        tensor_types=counts,
    )


def chat_template_source(path: Path) -> str | None:
    """The GGUF's own chat template (None for a base model), read from its header alone."""
    source = read_header(path)[0].get("tokenizer.chat_template")
    return source if isinstance(source, str) else None
