"""Which compute devices llama.cpp can use here, and how many layers to offload to them.

`detect()` asks the llama.cpp build itself (its backend registry and device list), so the
answer is about the library Freehold runs on, not about what nvidia-smi sees. `plan_offload`
is the one place that turns `--gpu-layers auto|N|0` into the layer count llama.cpp loads
with, from the devices' free memory and the model's own layer sizes (its GGUF tensor table)
beside the KV cache for the slots and context asked for. It is pure, so it is tested with
made-up devices; `resolve_offload` feeds it the real ones.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from freehold.errors import InvalidInput

GpuLayers = int | Literal["auto"]

GIB = 1 << 30
MIB = 1 << 20
# What `auto` sizes the KV cache for when the caller leaves slots or context to the engine:
# the most the engine picks by default (see scheduler.EngineConfig).
DEFAULT_SLOTS = 8
DEFAULT_CTX = 4096
# Kept free on the device beyond the estimate: llama.cpp's own bookkeeping, the CUDA graph
# pool, and what another process may take meanwhile.
RESERVE_FRACTION = 0.05
RESERVE_MIN_BYTES = 256 * MIB
_KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 values + an f16 scale
# ggml_backend_dev_type: CPU, GPU, IGPU, ACCEL, META
_DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_NOT_OFFLOAD = {"CPU", "BLAS", "RPC"}  # registries that do not take layers
_BLOCK = re.compile(r"blk\.(\d+)\.")

CPU_BUILD_HINT = (
    "rebuild it with `FREEHOLD_BACKEND=cuda make setup` (needs nvcc and an NVIDIA GPU; see "
    "docs/gpu.md), or pass --gpu-layers 0"
)


# ---- the build and its devices --------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One llama.cpp compute device with its memory as the backend reports it."""

    name: str  # llama.cpp's: CPU, CUDA0, Metal...
    description: str  # e.g. "NVIDIA H200"
    kind: str  # cpu, gpu, igpu, accel
    free_bytes: int
    total_bytes: int

    @property
    def offloads(self) -> bool:
        return self.kind in ("gpu", "igpu")


@dataclass(frozen=True)
class Backend:
    """What this llama.cpp build can run on."""

    name: str  # cpu, cuda, metal, vulkan... (the registries beside the CPU one)
    gpu_offload: bool  # llama_supports_gpu_offload()
    devices: tuple[Device, ...]
    system_info: str = ""

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.offloads) if self.gpu_offload else ()

    def gpu_free_bytes(self) -> int:
        return sum(d.free_bytes for d in self.gpus)

    def gpu_label(self) -> str:
        """The devices layers go to, for messages: "NVIDIA H200" or "2 GPUs (A, B)"."""
        names = [d.description or d.name for d in self.gpus]
        if len(names) == 1:
            return names[0]
        return f"{len(names)} GPUs ({', '.join(names)})"


@functools.cache
def _ggml() -> Any:
    """ggml's device-registry functions, typed (llama-cpp-python does not bind them).

    Looked up through the libllama llama-cpp-python loaded (dlsym searches its dependencies), so
    they come from the same libggml the engine uses, also when LLAMA_CPP_LIB_PATH points at a
    CUDA build (llama_cpp._ggml would load the package's own copy).
    """
    from llama_cpp import llama_cpp as bindings

    g = ctypes.CDLL(bindings._lib._name)  # the same handle; its own function-pointer cache
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for fn, args, res in (
        ("ggml_backend_reg_count", [], sz),
        ("ggml_backend_reg_get", [sz], vp),
        ("ggml_backend_reg_name", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_count", [], sz),
        ("ggml_backend_dev_get", [sz], vp),
        ("ggml_backend_dev_name", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_description", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_type", [vp], ctypes.c_int),
        ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
    ):
        f = getattr(g, fn)
        f.argtypes, f.restype = args, res
    return g


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", errors="replace") if raw else ""


def _device(g: Any, i: int) -> Device:
    dev = g.ggml_backend_dev_get(i)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(
        name=_text(g.ggml_backend_dev_name(dev)),
        description=_text(g.ggml_backend_dev_description(dev)).strip(),
        kind=_DEVICE_KINDS.get(g.ggml_backend_dev_type(dev), "other"),
        free_bytes=free.value,
        total_bytes=total.value,
    )


def detect() -> Backend:
    """The llama.cpp build's backend and its devices, with free memory as of now."""
    import llama_cpp as ll

    from freehold.engine.model import ensure_backend

    ensure_backend()
    g = _ggml()
    regs = [
        _text(g.ggml_backend_reg_name(g.ggml_backend_reg_get(i)))
        for i in range(g.ggml_backend_reg_count())
    ]
    accel = [r.lower() for r in regs if r.upper() not in _NOT_OFFLOAD]
    devices = tuple(_device(g, i) for i in range(g.ggml_backend_dev_count()))
    return Backend(
        name="+".join(accel) or "cpu",
        gpu_offload=bool(ll.llama_supports_gpu_offload()),
        devices=devices,
        system_info=_text(ll.llama_print_system_info()).strip(" |"),
    )


# ---- the request ----------------------------------------------------------------------------


def parse_gpu_layers(value: str | int | None) -> GpuLayers:
    """`--gpu-layers`: "auto" (None means auto too), or a layer count of 0 or more."""
    if value is None:
        return "auto"
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isdigit():
        return int(text)
    raise InvalidInput(
        f"--gpu-layers takes auto, 0 (CPU only) or a number of layers to offload, got {value!r}"
    )


def check_request(request: GpuLayers, backend: Backend) -> None:
    """Refuse a layer count this build cannot honour (never a silent CPU run)."""
    if request == "auto" or request == 0:
        return
    if not backend.gpu_offload:
        raise InvalidInput(
            f"--gpu-layers {request}: this llama.cpp build has no GPU backend "
            f"({backend.name} only); {CPU_BUILD_HINT}"
        )
    if not backend.gpus:
        raise InvalidInput(
            f"--gpu-layers {request}: this llama.cpp build supports {backend.name} but finds no "
            "GPU on this machine (check the driver with `nvidia-smi`), or pass --gpu-layers 0"
        )


def checked_gpu_layers(value: str | int | None) -> GpuLayers:
    """`--gpu-layers` parsed and checked against this build, before any work starts."""
    request = parse_gpu_layers(value)
    if request not in ("auto", 0):
        check_request(request, detect())
    return request


# ---- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What offloading costs per layer, from a GGUF's metadata and tensor table."""

    n_layer: int
    layer_bytes: tuple[int, ...]  # weights of each repeating block, blk.0 first
    output_bytes: int  # the output layer (norm + output matrix, or tied embeddings)
    kv_values_per_token: tuple[int, ...]  # per layer: n_head_kv * (key_length + value_length)
    n_ctx_train: int
    n_vocab: int
    n_embd: int

    def kv_bytes(self, layers: range | list[int], tokens: int, kv_type: str) -> int:
        per = _KV_BYTES_PER_ELEMENT.get(kv_type, 2.0)
        return int(sum(self.kv_values_per_token[i] for i in layers) * tokens * per)


def _per_layer(value: Any, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list | tuple):
        vals = [int(v) for v in value][:n_layer]
        return vals + [default] * (n_layer - len(vals))
    return [int(value if value is not None else default)] * n_layer


def model_shape(path: Path) -> ModelShape:
    """Layer sizes and KV width of the GGUF at `path` (reads only its header)."""
    from freehold.vault.gguf_meta import read_header

    meta, tensors = read_header(path)
    arch = str(meta.get("general.architecture", ""))
    n_layer = int(meta.get(f"{arch}.block_count") or 0)
    n_embd = int(meta.get(f"{arch}.embedding_length") or 0)
    layer_bytes = [0] * n_layer
    sizes: dict[str, int] = {}
    for t in tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += t.n_bytes
        else:
            sizes[t.name] = t.n_bytes
    # Tied embeddings: llama.cpp puts a copy of token_embd on the output layer's device.
    output = sizes.get("output.weight", sizes.get("token_embd.weight", 0))
    output += sizes.get("output_norm.weight", 0)
    heads = _per_layer(meta.get(f"{arch}.attention.head_count"), n_layer, 1)
    heads_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv"), n_layer, 0)
    kv = []
    for h, h_kv in zip(heads, heads_kv, strict=True):
        h = max(h, 1)
        k_len = int(meta.get(f"{arch}.attention.key_length") or n_embd // h)
        v_len = int(meta.get(f"{arch}.attention.value_length") or n_embd // h)
        kv.append((h_kv or h) * (k_len + v_len))
    tokens = meta.get("tokenizer.ggml.tokens")  # long arrays come back as their length only
    n_tokens = len(tokens) if isinstance(tokens, list) else getattr(tokens, "length", 0)
    vocab = meta.get(f"{arch}.vocab_size") or n_tokens
    return ModelShape(
        n_layer=n_layer,
        layer_bytes=tuple(layer_bytes),
        output_bytes=output,
        kv_values_per_token=tuple(kv),
        n_ctx_train=int(meta.get(f"{arch}.context_length") or 0),
        n_vocab=int(vocab),
        n_embd=n_embd,
    )


_NO_SHAPE = ModelShape(0, (), 0, (), 0, 0, 0)

# ---- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadPlan:
    """How a model is split between the CPU and the GPUs, and why."""

    gpu_layers: int  # what llama.cpp's n_gpu_layers gets: n_layer + 1 means all, output too
    n_layer: int
    device: str | None  # where the offloaded layers go (None: CPU only)
    device_bytes: int  # estimated device memory the offloaded part takes (weights + KV)
    summary: str  # one line for people: "GPU offload: 30/30 layers on NVIDIA H200 (...)"
    gpu_build: bool = True  # False: llama.cpp was built without GPU offload (nothing to choose)

    @property
    def active(self) -> bool:
        return self.gpu_layers > 0

    @property
    def offloaded_layers(self) -> int:
        """Repeating layers on the device (the output layer is not counted)."""
        return min(self.gpu_layers, self.n_layer)

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "gpu_layers": self.gpu_layers,
            "offloaded_layers": self.offloaded_layers,
            "layers": self.n_layer,
            "device": self.device,
            "device_bytes": self.device_bytes,
            "summary": self.summary,
            "gpu_build": self.gpu_build,
        }


@dataclass(frozen=True)
class Workload:
    """What besides the weights lives on the device: KV cache and compute buffers."""

    slots: int = DEFAULT_SLOTS
    ctx_per_slot: int = DEFAULT_CTX
    kv_type: str = "f16"
    n_batch: int = 512

    @property
    def kv_tokens(self) -> int:
        return self.slots * self.ctx_per_slot


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def compute_bytes(shape: ModelShape, work: Workload) -> int:
    """llama.cpp's device compute buffer, roughly: a batch of logits and activations."""
    return work.n_batch * (shape.n_vocab + 8 * shape.n_embd) * 4 + 128 * MIB


def offload_bytes(shape: ModelShape, layers: int, work: Workload) -> int:
    """Device memory for `layers` (llama.cpp's count: the last ones, then the output layer)."""
    if layers <= 0:
        return 0
    blocks = range(max(shape.n_layer - layers, 0), shape.n_layer)
    total = sum(shape.layer_bytes[i] for i in blocks) + shape.kv_bytes(
        blocks, work.kv_tokens, work.kv_type
    )
    if layers > shape.n_layer:
        total += shape.output_bytes
    return total + compute_bytes(shape, work)


def usable_bytes(backend: Backend) -> int:
    """GPU memory free for models now, less a reserve for llama.cpp and other processes."""
    free = backend.gpu_free_bytes()
    return max(0, free - max(int(free * RESERVE_FRACTION), RESERVE_MIN_BYTES))


def _fit(shape: ModelShape, usable: int, work: Workload) -> int:
    """The most layers (llama.cpp's count) whose device memory fits in `usable`."""
    if offload_bytes(shape, shape.n_layer + 1, work) <= usable:
        return shape.n_layer + 1
    best = 0
    for k in range(1, shape.n_layer + 1):  # bytes grow with k: stop at the first miss
        if offload_bytes(shape, k, work) > usable:
            break
        best = k
    return best


def plan_offload(
    request: GpuLayers, shape: ModelShape, backend: Backend, work: Workload
) -> OffloadPlan:
    """Resolve `auto|N|0` to a layer count for this model on these devices, with a reason."""
    check_request(request, backend)
    n = shape.n_layer
    kv_note = f"{work.slots} slot{'s' if work.slots != 1 else ''} x {work.ctx_per_slot} tokens"
    if request == 0:
        return OffloadPlan(0, n, None, 0, "GPU offload: off (--gpu-layers 0)")
    if not backend.gpu_offload:
        build = "CPU" if backend.name == "cpu" else backend.name
        text = f"GPU offload: none ({build} build of llama.cpp)"
        return OffloadPlan(0, n, None, 0, text, gpu_build=False)
    if not backend.gpus:
        return OffloadPlan(0, n, None, 0, f"GPU offload: none (no GPU found by {backend.name})")
    label, free, usable = backend.gpu_label(), backend.gpu_free_bytes(), usable_bytes(backend)
    if request != "auto":
        layers = min(int(request), n + 1)
        need = offload_bytes(shape, layers, work)
        warn = "" if need <= usable else f"; needs about {_gib(need)}, may not fit"
        text = (
            f"GPU offload: {min(layers, n)}/{n} layers on {label} "
            f"(--gpu-layers {request}; {_gib(free)} free{warn})"
        )
        return OffloadPlan(layers, n, label, need, text)
    layers = _fit(shape, usable, work)
    need = offload_bytes(shape, layers, work)
    if layers == 0:
        text = (
            f"GPU offload: none (not one layer fits in {_gib(free)} free on {label} beside "
            f"the KV cache for {kv_note})"
        )
        return OffloadPlan(0, n, None, 0, text)
    rest = "" if layers > n else f"; the rest do not fit beside the KV cache for {kv_note}"
    text = (
        f"GPU offload: {min(layers, n)}/{n} layers on {label} "
        f"(about {_gib(need)} of {_gib(free)} free{rest})"
    )
    return OffloadPlan(layers, n, label, need, text)


def full_offload_bytes(request: GpuLayers, shape: ModelShape, work: Workload) -> int:
    """Device memory a model would like: all layers for auto, the count asked otherwise."""
    layers = shape.n_layer + 1 if request == "auto" else int(request)
    return offload_bytes(shape, layers, work)


def workload(
    shape: ModelShape,
    slots: int | None,
    ctx_per_slot: int | None,
    kv_type: str = "f16",
    n_batch: int = 512,
) -> Workload:
    """The engine's sizing when the caller leaves slots or context to it (see scheduler)."""
    ctx = ctx_per_slot or min(shape.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX)
    return Workload(slots or DEFAULT_SLOTS, -(-ctx // 256) * 256, kv_type, max(n_batch, 1))


def resolve_offload(
    request: GpuLayers,
    path: Path,
    *,
    slots: int | None = None,
    ctx_per_slot: int | None = None,
    kv_type: str = "f16",
    n_batch: int = 512,
    backend: Backend | None = None,
) -> OffloadPlan:
    """The plan for loading the GGUF at `path` now, on this machine's devices."""
    backend = backend or detect()
    check_request(request, backend)  # before reading anything: the flag is wrong regardless
    if request == 0 or not backend.gpus:
        # Nothing to size: the header is not read (the loader reports the layer count).
        return plan_offload(request, _NO_SHAPE, backend, Workload())
    shape = model_shape(path)
    return plan_offload(
        request, shape, backend, workload(shape, slots, ctx_per_slot, kv_type, n_batch)
    )


def loaded_plan(gpu_layers: int, n_layer: int) -> OffloadPlan:
    """The plan of a model its caller loaded itself (an `Engine` given a `Model`)."""
    if gpu_layers == 0:
        return OffloadPlan(0, n_layer, None, 0, "GPU offload: none (loaded for the CPU)")
    shown = n_layer if gpu_layers < 0 else min(gpu_layers, n_layer)
    text = f"GPU offload: {shown}/{n_layer} layers (as the caller loaded the model)"
    return OffloadPlan(gpu_layers, n_layer, "GPU", 0, text)
