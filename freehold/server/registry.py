"""The models a server offers: their load state, engines, and admission control.

Admission is counted here, not only in the engine: a request is "in flight" from admission
until its handler ends, and at most slots + max_queue requests may be in flight per model.
Counting at the HTTP layer makes the limit exact (the engine's own queue drains on its
scheduler thread, so it could briefly look fuller or emptier than the truth).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from freehold.engine import Engine, EngineStats, ModelPool, SamplingParams
from freehold.errors import InvalidInput
from freehold.server.errors import APIError, from_engine
from freehold.server.metrics import Metrics


@dataclass
class _Model:
    id: str
    created: int
    future: Future[Engine] | None = None
    load_started: float = 0.0
    inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    external: Engine | None = None  # made elsewhere (an upstream): always loaded, never warmed


class ModelRegistry:
    def __init__(
        self,
        pool: ModelPool,
        ids: list[str],
        max_queue: int,
        metrics: Metrics,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self.max_queue = max_queue
        self.metrics = metrics
        now = int(time.time())
        self._models = {i: _Model(i, now) for i in ids}
        self.aliases = dict(aliases or {})  # client-facing name -> served id (--alias)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="freehold-warm")

    @property
    def ids(self) -> list[str]:
        return list(self._models)

    def created(self, model_id: str) -> int:
        return self._models[model_id].created

    def start_loading(self, eager: list[str] | None = None) -> None:
        """Begin loading `eager` (default: every model); the rest load on first request."""
        for m in self._models.values():
            if eager is None or m.id in eager:
                self._load(m)

    def add_external(self, model_id: str, engine: Engine) -> None:
        """Serve `model_id` from an engine made elsewhere (e.g. a group of upstream servers).

        It is "loaded" from the start and never goes through the pool; an engine with an
        `available()` method (false: e.g. every upstream is cooling down) reports that in
        /ready."""
        if model_id in self._models:
            raise InvalidInput(f"{model_id!r} is served twice: by a local model and an upstream")
        m = _Model(model_id, int(time.time()), external=engine)
        m.future = Future()
        m.future.set_result(engine)
        self._models[model_id] = m

    def is_external(self, model_id: str) -> bool:
        m = self._models.get(model_id)
        return m is not None and m.external is not None

    def _load(self, m: _Model) -> Future[Engine]:
        fut = m.future
        if m.external is not None and fut is not None:
            return fut
        if fut is not None and (not fut.done() or (fut.exception() is None and self._alive(m))):
            return fut
        m.load_started = time.perf_counter()
        m.future = fut = self._loader.submit(self._load_and_warm, m)
        return fut

    def _load_and_warm(self, m: _Model) -> Engine:
        engine = self.pool.get(m.id)
        # llama.cpp's first decode in a context is slow (buffers, weight repacking): pay it here,
        # so that readiness means the first request is served at full speed.
        engine.complete("Hello", SamplingParams(max_tokens=1, temperature=0), timeout=300)
        self.metrics.load_seconds.labels(m.id).set(time.perf_counter() - m.load_started)
        return engine

    def _alive(self, m: _Model) -> bool:
        if m.external is not None:
            available = getattr(m.external, "available", None)
            return available() if available is not None else True
        # The pool may have unloaded an idle model to make room; then it must load again.
        return m.id in self.pool.loaded()

    def known(self, model_id: str) -> bool:
        return model_id in self._models

    def resolve(self, name: str) -> str:
        """The served id a client's model name stands for: itself or an alias; else 404."""
        if name in self._models:
            return name
        target = self.aliases.get(name)
        if target is not None and target in self._models:
            return target
        served = ", ".join(self._models)
        raise APIError(
            404,
            f"the model {name!r} does not exist on this server (served: {served}); map other "
            "names with `freehold serve --alias NAME=MODEL`",
            param="model",
            code="model_not_found",
        )

    def load(self, model_id: str) -> Future[Engine]:
        """Start loading a served model unless it is loaded or loading; the load's future.

        For doors whose clients expect a request to wait while its model loads (Ollama's)
        instead of getting 503 and retrying."""
        return self._load(self._models[self.resolve(model_id)])

    async def wait_loaded(self, model_id: str, timeout_s: float) -> None:
        """Start loading a served model if needed and wait up to `timeout_s` for the load.

        A failed or slow load is not raised here: `engine()` reports it."""
        fut = self.load(model_id)
        if not fut.done() and timeout_s > 0:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout_s)

    def engine(self, model_id: str) -> Engine:
        """The running engine, or 404 (not served) / 503 (still loading) / 500 (load failed)."""
        m = self._models[self.resolve(model_id)]
        fut = self._load(m)
        if not fut.done():
            self.metrics.rejected.labels(model_id, "loading").inc()
            raise APIError(
                503,
                f"model {model_id} is still loading after the server's --load-wait; retry shortly",
                code="model_loading",
                headers={"Retry-After": "2"},
            )
        exc = fut.exception()
        if exc is not None:
            raise from_engine(exc) if not isinstance(exc, APIError) else exc
        return fut.result()

    def ready(self) -> dict[str, str]:
        """Each model's state: loaded, loading or failed."""
        out = {}
        for m in self._models.values():
            fut = m.future
            if fut is None:
                out[m.id] = "on demand"
            elif not fut.done():
                out[m.id] = "loading"
            elif fut.exception() is not None:
                out[m.id] = f"failed: {fut.exception()}"
            else:
                down = "unreachable" if m.external is not None else "unloaded"
                out[m.id] = "loaded" if self._alive(m) else down
        return out

    def failed(self) -> dict[str, str]:
        """The models whose load failed, with why."""
        return {m: why for m, why in self.ready().items() if why.startswith("failed")}

    def all_ready(self) -> bool:
        """Every model loaded or left for first use: what /ready and the banner wait for."""
        return all(v in ("loaded", "on demand") for v in self.ready().values())

    def stats(self) -> list[EngineStats]:
        out = []
        for m in self._models.values():
            fut = m.future
            if fut is not None and fut.done() and fut.exception() is None and self._alive(m):
                out.append(fut.result().stats())
        return out

    def admit(self, model_id: str, engine: Engine, count: int) -> None:
        """Reserve `count` places (one per choice) or refuse at once with 429."""
        m = self._models[model_id]
        capacity = engine.n_slots + self.max_queue
        with m.lock:
            if m.inflight + count > capacity:
                self.metrics.rejected.labels(model_id, "queue_full").inc()
                raise APIError(
                    429,
                    f"model {model_id} is at capacity ({engine.n_slots} running and "
                    f"{self.max_queue} queued); retry shortly",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            m.inflight += count

    def release(self, model_id: str, count: int) -> None:
        m = self._models[model_id]
        with m.lock:
            m.inflight -= count

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    def inflight(self, model_id: str | None = None) -> int:
        """Requests admitted and not finished: for one model, or for all."""
        if model_id is not None:
            return self._models[model_id].inflight
        return sum(m.inflight for m in self._models.values())
