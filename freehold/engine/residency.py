"""Several models resident at once under a memory budget.

Each loaded model is its own `Engine` with its own scheduler thread. Loads run on a background
loader thread (llama.cpp releases the GIL while reading weights), so models already loaded keep
serving. When a new model does not fit, idle models are unloaded least-recently-used first; a
model idle for longer than its keep-alive is unloaded by a reaper thread. Host memory and GPU
memory are both counted: a model that would not fit in host memory is an error, while one
whose layers would not all fit on the GPU first frees GPU memory held by idle models, and
then gets the layers that fit (engine/devices.py decides how many). All engines share one
`PromptCache`, so conversations saved from a model survive its unload and reload.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from freehold.engine import devices
from freehold.engine.model import available_ram_bytes
from freehold.engine.prompt_cache import PromptCache
from freehold.engine.scheduler import Engine, EngineConfig
from freehold.errors import FreeholdError
from freehold.vault import ModelSpec, resolve_model_spec

# How the pool makes an engine: Engine(path, config, name=…, prompt_cache=…) or a stand-in with
# its interface (a cluster's, whose replicas run elsewhere).
EngineFactory = Callable[..., Engine]


class InsufficientMemory(FreeholdError):
    """A model does not fit in the memory budget even after unloading every idle model."""


def default_resolver(ref: str) -> ModelSpec:
    """Vault names, .gguf paths, and BASE+ADAPTER references."""
    return resolve_model_spec(ref)


def _with_adapters(config: EngineConfig | None, spec: ModelSpec) -> EngineConfig | None:
    if not spec.adapters:
        return config
    return replace(config or EngineConfig(), adapters=tuple(str(a) for a in spec.adapters))


@dataclass
class _Entry:
    ref: str
    engine: Engine
    bytes: int  # host memory
    device_bytes: int = 0  # GPU memory (the offloaded layers and their KV cache)
    last_used: float = field(default_factory=time.monotonic)

    def idle_since(self) -> float:
        return max(self.last_used, self.engine.last_active)

    def resident(self) -> Resident:
        return Resident(
            self.ref, self.bytes, self.device_bytes, self.idle_since(), self.engine.busy
        )


@dataclass(frozen=True)
class Resident:
    """What deciding an unload needs to know about one loaded model."""

    ref: str
    host_bytes: int
    device_bytes: int
    idle_since: float
    busy: bool


@dataclass(frozen=True)
class Room:
    """What a model about to load needs, and the budgets it must fit in."""

    ref: str
    host_bytes: int
    host_budget: int
    device_bytes: int = 0  # 0 on a CPU-only build, or with --gpu-layers 0
    device_budget: int = 0  # free GPU memory plus what loaded models hold there


def choose_unloads(resident: list[Resident], room: Room) -> list[str]:
    """Idle models to unload, least recently used first, so that `room` fits.

    Host memory must fit (else InsufficientMemory). GPU memory is freed only from idle models
    that hold some; when that is not enough the new model still loads, with fewer layers.
    """
    idle = sorted((r for r in resident if not r.busy), key=lambda r: r.idle_since)
    host = sum(r.host_bytes for r in resident)
    device = sum(r.device_bytes for r in resident)
    victims: list[str] = []
    while host + room.host_bytes > room.host_budget:
        if not idle:
            busy = "; the loaded models are busy, retry later" if resident else ""
            raise InsufficientMemory(
                f"loading {room.ref} needs about {room.host_bytes >> 20} MiB but only "
                f"{(room.host_budget - host) >> 20} MiB of the "
                f"{room.host_budget >> 20} MiB budget is free{busy}; "
                "raise the memory budget or use a smaller model"
            )
        victim = idle.pop(0)
        victims.append(victim.ref)
        host, device = host - victim.host_bytes, device - victim.device_bytes
    while room.device_bytes and device + room.device_bytes > room.device_budget:
        holder = next((r for r in idle if r.device_bytes > 0), None)
        if holder is None:
            break
        idle.remove(holder)
        victims.append(holder.ref)
        host, device = host - holder.host_bytes, device - holder.device_bytes
    return victims


class ModelPool:
    """Get an `Engine` per model reference, loading and unloading as memory and use dictate."""

    def __init__(
        self,
        *,
        budget_bytes: int | None = None,
        keep_alive_s: float = 300.0,
        config: EngineConfig | None = None,
        resolver: Callable[[str], Path | ModelSpec] = default_resolver,
        prompt_cache: PromptCache | None = None,
        engine_factory: EngineFactory = Engine,
    ) -> None:
        self._engine_factory = engine_factory  # Engine here; ClusterEngine on a Ray cluster
        # A factory object holding a connection (a Ray cluster's) is closed with the pool.
        holds = not isinstance(engine_factory, type)
        self._close_factory = getattr(engine_factory, "close", None) if holds else None
        self.budget_bytes = budget_bytes or int(available_ram_bytes() * 0.75)
        self.prompt_cache = prompt_cache
        self.keep_alive_s = keep_alive_s
        self.config = config
        self._resolve = resolver
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, Future[Engine]] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="freehold-load")
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="freehold-reaper", daemon=True)
        self._reaper.start()

    # -- public --------------------------------------------------------------------------------

    def load(self, ref: str, config: EngineConfig | None = None) -> Future[Engine]:
        """Start loading `ref` in the background (or return the loaded/in-flight one)."""
        spec = self.spec(ref)  # NotFound raises here, at once
        with self._lock:
            if ref in self._entries:
                e = self._entries[ref]
                e.last_used = time.monotonic()
                done: Future[Engine] = Future()
                done.set_result(e.engine)
                return done
            fut = self._loading.get(ref)
            if fut is None:
                cfg = _with_adapters(config or self.config, spec)
                fut = self._loader.submit(self._load, ref, spec.path, cfg)
                self._loading[ref] = fut
            return fut

    def spec(self, ref: str) -> ModelSpec:
        """What `ref` loads (weights file and adapters), without loading it; NotFound if none."""
        resolved = self._resolve(ref)
        return resolved if isinstance(resolved, ModelSpec) else ModelSpec(ref, Path(resolved))

    def get(
        self, ref: str, *, timeout: float | None = None, config: EngineConfig | None = None
    ) -> Engine:
        """The engine for `ref`, loading it first if needed (blocks only the caller)."""
        return self.load(ref, config).result(timeout)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def loading(self) -> list[str]:
        with self._lock:
            return list(self._loading)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values())

    def used_device_bytes(self) -> int:
        with self._lock:
            return sum(e.device_bytes for e in self._entries.values())

    def offload(self) -> dict[str, devices.OffloadPlan]:
        """How each loaded model is split between CPU and GPU."""
        with self._lock:
            return {ref: e.engine.offload for ref, e in self._entries.items()}

    @staticmethod
    def estimate_bytes(path: Path) -> int:
        """Memory a model will take before it is loaded: weights plus KV and compute headroom."""
        return int(path.stat().st_size * 1.3) + (64 << 20)

    def unload(self, ref: str) -> bool:
        with self._lock:
            e = self._entries.pop(ref, None)
        if e is None:
            return False
        e.engine.close()
        return True

    def close(self) -> None:
        self._closed.set()
        self._loader.shutdown(wait=True)
        for ref in self.loaded():
            self.unload(ref)
        if self._close_factory is not None:
            self._close_factory()

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _load(self, ref: str, path: Path, config: EngineConfig | None) -> Engine:
        try:
            self._make_room(self._room(ref, path, config or EngineConfig()))
            engine = self._engine_factory(path, config, name=ref, prompt_cache=self.prompt_cache)
            on_device = engine.offload.device_bytes
            host = max(engine.resident_bytes() - on_device, 0)
            with self._lock:
                self._entries[ref] = _Entry(ref, engine, host, on_device)
            return engine
        finally:
            with self._lock:
                self._loading.pop(ref, None)

    def _room(self, ref: str, path: Path, config: EngineConfig) -> Room:
        host = Room(ref, self.estimate_bytes(path), self.budget_bytes)
        if config.gpu_layers == 0 or not path.is_file():
            return host
        backend = devices.detect()
        if not backend.gpus:
            return host  # CPU only: nothing changes
        shape = devices.model_shape(path)
        work = devices.workload(
            shape, config.n_slots, config.n_ctx_per_slot, config.kv_type, config.n_batch
        )
        want = devices.full_offload_bytes(config.gpu_layers, shape, work)
        budget = devices.usable_bytes(backend) + self.used_device_bytes()
        return replace(host, device_bytes=want, device_budget=budget)

    def _make_room(self, room: Room) -> None:
        with self._lock:
            resident = [e.resident() for e in self._entries.values()]
            for ref in choose_unloads(resident, room):
                self._entries.pop(ref).engine.close()

    def _reap(self) -> None:
        period = max(0.05, min(self.keep_alive_s / 4, 5.0))
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._lock:
                stale = [
                    e
                    for e in self._entries.values()
                    if not e.engine.busy and now - e.idle_since() > self.keep_alive_s
                ]
                for e in stale:
                    self._entries.pop(e.ref)
            for e in stale:
                e.engine.close()
