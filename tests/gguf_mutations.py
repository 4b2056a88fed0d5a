"""Mutated copies of the real SmolLM2 and Gemma GGUF headers, for the vault's fuzz tests and
its benchmark (benchmarks/bench_vault.py).

A `Seed` is a real header taken apart once: its key/value entries byte for byte, and its tensor
table. `small_seed` keeps every key (the whole tokenizer, the chat template) but only the
model's F32 tensors with their real data, so a file is whole yet a few MB; `full_seed` keeps
everything, for the few files that go through `freehold run`. `build` lays a seed out as GGUF
and records where each field and boundary lies; the mutation classes below change those bytes.
Each mutation draws from a `random.Random`: Hypothesis passes its own (shrinkable, seeded),
the benchmark a seeded one, so both see the same kinds of damage.

This walker is written apart from `freehold.vault.gguf_meta` on purpose: it only ever reads the
intact files, and it cross-checks the scanner's reading of them.
"""

from __future__ import annotations

import ctypes
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from freehold.vault.gguf_meta import SCALAR_FORMATS

HUGE = [
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


@dataclass(frozen=True)
class Field:
    """One fixed-width number in a built file: what it is and where it lies."""

    kind: str  # version | count | length | type | scalar | dim | ggml_type | offset
    start: int
    width: int
    label: str


@dataclass
class KV:
    key: bytes
    vtype: int
    value: bytes  # the value's bytes as in the file, after its type tag
    fields: list[tuple[str, int, int, str]]  # (kind, start within value, width, label)


@dataclass
class Tensor:
    name: bytes
    dims: list[int]
    ggml_type: int
    n_bytes: int
    source_offset: int  # absolute, in the source file


@dataclass
class Seed:
    label: str
    source: Path
    version: int
    kvs: list[KV]
    tensors: list[Tensor]
    alignment: int
    data: bytes | None = None  # small seeds: every tensor's bytes, padded, in order

    def key_index(self, key: str) -> int:
        return next(i for i, kv in enumerate(self.kvs) if kv.key == key.encode())


@dataclass
class Built:
    """A seed laid out as GGUF: the bytes and what lies where."""

    data: bytes
    fields: list[Field]
    boundaries: list[int]
    header_end: int  # where the tensor table ends (before the data section's padding)
    data_start: int


# ---- reading an intact file --------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> int:
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        self.pos += n
        return self.data[self.pos - n : self.pos]


def _walk_value(r: _Reader, vtype: int, base: int, fields: list, label: str) -> None:
    """Step over one value, noting its numeric fields (a few per long array)."""
    t = GGUFValueType(vtype)
    if t == GGUFValueType.STRING:
        fields.append(("length", r.pos - base, 8, f"{label} length"))
        r.string()
    elif t == GGUFValueType.ARRAY:
        fields.append(("type", r.pos - base, 4, f"{label} item type"))
        itype = r.take("<I")
        fields.append(("count", r.pos - base, 8, f"{label} count"))
        n = r.take("<Q")
        if itype != GGUFValueType.STRING:
            size = struct.calcsize(SCALAR_FORMATS[GGUFValueType(itype)])
            for i in (0, n - 1) if n else ():
                fields.append(("scalar", r.pos - base + i * size, size, f"{label}[{i}]"))
            r.pos += n * size
            return
        for i in range(n):
            if i < 3 or i == n - 1 or i % 4096 == 0:  # a sample of the strings' lengths
                fields.append(("length", r.pos - base, 8, f"{label}[{i}] length"))
            r.string()
    else:
        size = struct.calcsize(SCALAR_FORMATS[t])
        fields.append(("scalar", r.pos - base, size, label))
        r.pos += size


def read_seed(path: Path, label: str, keep: Callable[[Tensor], bool]) -> Seed:
    """Take a real GGUF apart; keep the tensors `keep` selects (their data stays in `path`)."""
    with open(path, "rb") as f:
        head = f.read(16 << 20)  # both packaged headers are well under this
    r = _Reader(head)
    assert r.take("<I") == 0x46554747, f"{path} is not GGUF"
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kvs = []
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("<I")
        start, fields = r.pos, []
        _walk_value(r, vtype, start, fields, key.decode())
        kvs.append(KV(key, vtype, head[start : r.pos], fields))
    alignment = next(
        (struct.unpack("<I", kv.value)[0] for kv in kvs if kv.key == b"general.alignment"), 32
    )
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append((name, dims, r.take("<I"), r.take("<Q")))
    data_start = -(-r.pos // alignment) * alignment
    tensors = []
    for name, dims, gtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        n = 1
        for d in dims:
            n *= d
        tensors.append(Tensor(name, dims, gtype, n // block * type_size, data_start + offset))
    return Seed(label, path, version, kvs, [t for t in tensors if keep(t)], alignment)


def small_seed(path: Path, label: str) -> Seed:
    """Every key of the real header, and only its F32 tensors (norms), with their real bytes."""
    seed = read_seed(path, label, lambda t: t.ggml_type == GGMLQuantizationType.F32)
    chunks = []
    with open(path, "rb") as f:
        for t in seed.tensors:
            f.seek(t.source_offset)
            chunks.append(f.read(t.n_bytes) + bytes(_pad(t.n_bytes, seed.alignment) - t.n_bytes))
    seed.data = b"".join(chunks)
    return seed


def full_seed(path: Path, label: str) -> Seed:
    """The whole real file: header as it is, data copied from `path` when written."""
    return read_seed(path, label, lambda t: True)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# ---- writing ----------------------------------------------------------------------------


def build(seed: Seed) -> Built:
    """Lay the seed out as GGUF. Full seeds get their header only (see `write_whole`)."""
    out = bytearray()
    fields: list[Field] = []
    bounds: list[int] = []

    def put(b: bytes, kind: str | None = None, label: str = "") -> None:
        bounds.append(len(out))
        if kind:
            fields.append(Field(kind, len(out), len(b), label))
        out.extend(b)

    put(b"GGUF")
    put(struct.pack("<I", seed.version), "version", "version")
    put(struct.pack("<Q", len(seed.tensors)), "count", "tensor count")
    put(struct.pack("<Q", len(seed.kvs)), "count", "key count")
    for kv in seed.kvs:
        name = kv.key.decode("utf-8", "replace")
        put(struct.pack("<Q", len(kv.key)), "length", f"key {name} length")
        put(kv.key)
        put(struct.pack("<I", kv.vtype), "type", f"key {name} type")
        base = len(out)
        put(kv.value)
        fields.extend(Field(k, base + rel, w, lab) for k, rel, w, lab in kv.fields)
        bounds.extend(base + rel for _, rel, _, _ in kv.fields)  # inside arrays too
    offset = 0
    for t in seed.tensors:
        name = t.name.decode("utf-8", "replace")
        put(struct.pack("<Q", len(t.name)), "length", f"tensor {name} name length")
        put(t.name)
        put(struct.pack("<I", len(t.dims)), "count", f"tensor {name} dimension count")
        for i, d in enumerate(t.dims):
            put(struct.pack("<Q", d), "dim", f"tensor {name} dim {i}")
        put(struct.pack("<I", t.ggml_type), "ggml_type", f"tensor {name} type")
        put(struct.pack("<Q", offset), "offset", f"tensor {name} offset")
        offset += _pad(t.n_bytes, seed.alignment)
    header_end = len(out)
    out.extend(bytes(_pad(len(out), seed.alignment) - len(out)))
    data_start = len(out)
    if seed.data is not None:
        at = data_start
        for t in seed.tensors:
            bounds.append(at)
            at += _pad(t.n_bytes, seed.alignment)
        out.extend(seed.data)
    bounds.append(len(out))
    return Built(bytes(out), fields, sorted(set(bounds)), header_end, data_start)


def write_whole(path: Path, seed: Seed, header: bytes) -> None:
    """A whole file from a (mutated) header of a full seed: header, padding, the real data."""
    first = seed.tensors[0].source_offset
    length = seed.tensors[-1].source_offset + seed.tensors[-1].n_bytes - first
    with open(path, "wb") as out, open(seed.source, "rb") as src:
        out.write(header)
        out.write(bytes(_pad(len(header), seed.alignment) - len(header)))
        src.seek(first)
        while length > 0:
            chunk = src.read(min(length, 8 << 20))
            out.write(chunk)
            length -= len(chunk)


# ---- mutation classes --------------------------------------------------------------------
# Each takes a seed, its built form and a Random, and returns (bytes, what was done).


def _encode(vtype: GGUFValueType, rnd: random.Random) -> bytes:
    """A well-formed value of `vtype`, its contents drawn from `rnd`."""
    if vtype == GGUFValueType.STRING:
        text = rnd.choice([b"", b"x", b"llama", b"[/]", "\u00e9\u4e2d".encode(), b"\xff\xfe"])
        return struct.pack("<Q", len(text)) + text
    if vtype == GGUFValueType.ARRAY:
        itype = rnd.choice([GGUFValueType.UINT32, GGUFValueType.STRING])
        items = [_encode(itype, rnd) for _ in range(rnd.randrange(3))]
        return struct.pack("<IQ", itype, len(items)) + b"".join(items)
    fmt = SCALAR_FORMATS[vtype]
    size = struct.calcsize(fmt)
    if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        x = rnd.choice([0.0, -1.0, 1e30, float("nan"), float("inf"), 8192.5])
        return struct.pack(fmt, x)
    return rnd.getrandbits(8 * size).to_bytes(size, "little")


def bit_flips(seed: Seed, built: Built, rnd: random.Random) -> tuple[bytes, str]:
    """1-4 flipped bits in the header: anywhere, or inside its numeric fields."""
    data = bytearray(built.data)
    bits = []
    for _ in range(rnd.randint(1, 4)):
        if rnd.random() < 0.3:
            f = rnd.choice(built.fields)
            bits.append(f.start * 8 + rnd.randrange(f.width * 8))
        else:
            bits.append(rnd.randrange(built.header_end * 8))
    for b in bits:
        data[b // 8] ^= 1 << (b % 8)
    return bytes(data), f"flipped bits {bits}"


def truncation(seed: Seed, built: Built, rnd: random.Random) -> tuple[bytes, str]:
    """The file cut at a field or tensor boundary (or a few bytes either side of one)."""
    at = rnd.choice(built.boundaries) + rnd.choice([0, 0, 0, -1, 1, -3, 3])
    at = min(max(at, 0), len(built.data) - 1)
    return built.data[:at], f"cut at byte {at} of {len(built.data)}"


def huge_numbers(seed: Seed, built: Built, rnd: random.Random) -> tuple[bytes, str]:
    """A count, length or dimension set to a huge value, or just past what the file holds."""
    f = rnd.choice([f for f in built.fields if f.kind in ("count", "length", "dim")])
    value = rnd.choice([*HUGE, len(built.data), len(built.data) + 1, len(built.data) // 2])
    return set_field(built.data, f, value), f"{f.label} = {value}"


def wrong_types(seed: Seed, built: Built, rnd: random.Random) -> tuple[bytes, str]:
    """A key's type changed: its tag alone (the bytes misread), or re-encoded well-formed."""
    if rnd.random() < 0.4:
        f = rnd.choice([f for f in built.fields if f.kind in ("type", "ggml_type")])
        value = rnd.choice([*range(14), 31, 42, 255, 2**31, 2**32 - 1])
        return set_field(built.data, f, value), f"{f.label} = {value}"
    i = rnd.randrange(len(seed.kvs))
    if rnd.random() < 0.6:  # the keys the catalog reads are the interesting ones
        keys = {kv.key.decode("utf-8", "replace") for kv in seed.kvs}
        wanted = [k.replace("{arch}", _arch(seed)) for k in _CATALOGUED]
        i = seed.key_index(rnd.choice([k for k in wanted if k in keys]))
    vtype = rnd.choice([t for t in GGUFValueType if t != seed.kvs[i].vtype])
    kvs = list(seed.kvs)
    kvs[i] = KV(kvs[i].key, vtype, _encode(vtype, rnd), [])
    return build(replace(seed, kvs=kvs)).data, f"{kvs[i].key!r} re-encoded as {vtype.name}"


_CATALOGUED = [
    "general.architecture",
    "general.name",
    "general.license",
    "general.file_type",
    "general.alignment",
    "{arch}.context_length",
    "{arch}.block_count",
    "{arch}.embedding_length",
    "tokenizer.ggml.tokens",
    "tokenizer.chat_template",
]


def _arch(seed: Seed) -> str:
    kv = seed.kvs[seed.key_index("general.architecture")]
    return kv.value[8:].decode()


def duplicates(seed: Seed, built: Built, rnd: random.Random) -> tuple[bytes, str]:
    """A key or tensor name that appears twice: a copied entry, or one renamed to another."""
    if rnd.random() < 0.6:
        kvs = list(seed.kvs)
        i, j = rnd.randrange(len(kvs)), rnd.randrange(len(kvs))
        if rnd.random() < 0.5:
            kvs.insert(j, kvs[i])
            what = f"key {kvs[i].key!r} copied to position {j}"
        else:
            kvs[j] = KV(kvs[i].key, kvs[j].vtype, kvs[j].value, kvs[j].fields)
            what = f"key #{j} renamed to {kvs[i].key!r}"
        return build(replace(seed, kvs=kvs)).data, what
    tensors = list(seed.tensors)
    i, j = rnd.randrange(len(tensors)), rnd.randrange(len(tensors))
    tensors[j] = replace(tensors[j], name=tensors[i].name)
    new = replace(seed, tensors=tensors)
    return build(new).data, f"tensor #{j} renamed to {tensors[i].name!r}"


def bad_offsets(seed: Seed, built: Built, rnd: random.Random) -> tuple[bytes, str]:
    """A tensor offset past the end, misaligned or overlapping; or the data cut short."""
    offsets = [f for f in built.fields if f.kind == "offset"]
    if rnd.random() < 0.2:
        at = rnd.randrange(built.data_start, len(built.data))
        return built.data[:at], f"data cut at byte {at} of {len(built.data)}"
    f = rnd.choice(offsets)
    current = int.from_bytes(built.data[f.start : f.start + 8], "little")
    value = rnd.choice(
        [
            len(built.data),
            len(built.data) - built.data_start + seed.alignment,
            current + 1,
            current + seed.alignment,
            max(current - seed.alignment, 0),
            0,
            *HUGE,
        ]
    )
    return set_field(built.data, f, value), f"{f.label} = {value} (was {current})"


def set_field(data: bytes, f: Field, value: int) -> bytes:
    out = bytearray(data)
    out[f.start : f.start + f.width] = (value % (1 << (8 * f.width))).to_bytes(f.width, "little")
    return bytes(out)


def value_flips(seed: Seed, built: Built, rnd: random.Random) -> tuple[bytes, str]:
    """Bits flipped where the layout survives: in the keys' values (hyperparameters, token
    ids) and in text (vocabulary, merges, template), so the header still parses but means
    nonsense. The length never changes, so this also serves whole files (`write_whole`)."""
    data = bytearray(built.data)
    scalars = [f for f in built.fields if f.kind == "scalar"]
    texts = [f for f in built.fields if f.kind == "length"]
    bits = []
    for _ in range(rnd.randint(1, 3)):
        if rnd.random() < 0.6:
            f = rnd.choice(scalars)
            bits.append(f.start * 8 + rnd.randrange(f.width * 8))
            continue
        f = rnd.choice(texts)  # a bit of the text that follows a length prefix
        n = int.from_bytes(built.data[f.start : f.start + 8], "little")
        if n:
            bits.append((f.start + 8) * 8 + rnd.randrange(n * 8))
    for b in bits:
        data[b // 8] ^= 1 << (b % 8)
    return bytes(data), f"flipped bits {bits}"


MUTATIONS: dict[str, Callable[[Seed, Built, random.Random], tuple[bytes, str]]] = {
    "bit flips": bit_flips,
    "truncation": truncation,
    "huge counts and lengths": huge_numbers,
    "wrong types": wrong_types,
    "duplicate keys and names": duplicates,
    "offsets past the end": bad_offsets,
    "value flips": value_flips,
}


# ---- llama.cpp's own GGUF reader, as the oracle ------------------------------------------


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_ggml: ctypes.CDLL | None = None


def llama_cpp_opens(path: Path) -> bool:
    """Whether llama.cpp's `gguf_init_from_file` (the reader every model load starts with)
    accepts the file's header and tensor table; it reads no tensor data."""
    global _ggml
    if _ggml is None:
        import llama_cpp

        from freehold.engine.model import ensure_backend

        ensure_backend()  # silences ggml's log, which would print each refusal
        # the copy libllama itself links (the wheel ships .so and .so.0 as separate files)
        lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so.0"
        _ggml = ctypes.CDLL(str(lib))
        _ggml.gguf_init_from_file.restype = ctypes.c_void_p
        _ggml.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
        _ggml.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = _ggml.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if ctx:
        _ggml.gguf_free(ctx)
    return bool(ctx)


def corpus(seeds: list[Seed], per_class: int, seed: int = 13) -> dict[str, list[tuple[bytes, str]]]:
    """`per_class` mutated files of each class, spread over `seeds`, drawn reproducibly."""
    rnd = random.Random(seed)
    built = [(s, build(s)) for s in seeds]
    return {
        name: [mutate(*built[i % len(built)], rnd) for i in range(per_class)]
        for name, mutate in MUTATIONS.items()
    }
