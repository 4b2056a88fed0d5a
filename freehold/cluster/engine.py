"""`ClusterEngine`: what the model pool hands the server when a model's replicas run on a Ray
cluster. It has the engine's interface (the doors cannot tell the difference): prompts are
templated and tokenized here with the model's vocabulary (no weights on the gateway), and the
token ids go to a replica through a Serve handle.

Failover: when a replica's node dies mid-stream, the request is resumed on a live replica from
the prompt plus the tokens already delivered, with the token budget that is left. The client
sees one stream; only delivered tokens are billed; each resume counts on the handle
(`failovers`), and the server writes it to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from freehold.cluster.ray_serve import ClusterPlan, RayCluster
from freehold.cluster.replica import Served
from freehold.engine import (
    Delta,
    EngineConfig,
    EngineStats,
    Finished,
    Model,
    PromptCache,
    RequestHandle,
    SamplingParams,
    Timings,
    Usage,
)
from freehold.engine.devices import OffloadPlan
from freehold.engine.front import EngineFront
from freehold.engine.types import Outbox

log = logging.getLogger(__name__)

_ids = itertools.count(1_000_000_001)  # apart from local engines' request ids
MAX_FAILOVERS = 3
FAILOVER_PAUSE_S = 0.2


def _failover_errors() -> tuple[type[BaseException], ...]:
    """What a stream raises when its replica (or the replica's node) is gone."""
    from ray import exceptions as rx

    return (rx.RayActorError, rx.ActorUnavailableError, rx.NodeDiedError, rx.ObjectLostError)


class _Cancel:
    """A RequestHandle's wake-up on cancel: stops the task that drives its stream."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def set(self) -> None:
        if self.task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


class ClusterEngine(EngineFront):
    """One served model whose replicas run on a Ray cluster (see module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: EngineConfig | None = None,
        *,
        name: str | None = None,
        prompt_cache: PromptCache | None = None,  # the replicas keep their own
        cluster: RayCluster,
    ) -> None:
        self.config = cfg = config or EngineConfig()
        self.cluster = cluster
        self.model = Model(path, vocab_only=True)
        self.name = name or Path(path).stem
        self.chat_template_override = cfg.chat_template
        self.offload = OffloadPlan(0, self.model.n_layer, None, 0, "on the cluster's replicas")
        try:
            self._handle = cluster.deploy(self.name, Path(path), cfg)
            facts = self._handle.facts.remote().result(timeout_s=120)
        except BaseException:
            self.model.close()
            raise
        self.n_ctx_per_slot: int = facts["n_ctx_per_slot"]
        self.slots_per_replica: int = facts["n_slots"]
        # What admission counts: the slots of every replica the deployment runs (at most).
        self.n_slots = self.slots_per_replica * cluster.replica_targets[self.name]
        self._lock = threading.Lock()
        self._outbox = Outbox()
        self._flush_scheduled = False  # touched on the cluster loop's thread only
        self._running = 0
        self._generated = self._prompt_computed = self._prompt_cached = 0
        self._hits = self._misses = 0
        self.failovers = 0
        # Per replica id: requests finished there, and those that reused a cached prefix.
        self.requests_by_replica: Counter[str] = Counter()
        self.cache_hits_by_replica: Counter[str] = Counter()
        self.last_active = time.monotonic()

    # -- sizing --------------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        return 0  # the weights live on the replicas; the gateway holds only the vocabulary

    def replica_nodes(self) -> list[str]:
        return self.cluster.replica_nodes(self.name)

    # -- requests ------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        add_special: bool = True,
    ) -> RequestHandle:
        """Queue a completion on a replica; returns at once."""
        tokens, params = self._prepare(prompt, params, add_special)
        # One seed for every attempt, so a resumed request samples as the first one did.
        params = replace(params, seed=params.resolved_seed())
        cancel = _Cancel()
        handle = RequestHandle(next(_ids), cancel, self._outbox)  # type: ignore[arg-type]
        handle.seed = params.seed
        handle.prompt_tokens = len(tokens)
        loop = self.cluster.loop
        cancel.loop = loop

        def start() -> None:
            cancel.task = loop.create_task(self._drive(handle, tokens, params))

        with self._lock:
            self._running += 1
        self.last_active = time.monotonic()
        loop.call_soon_threadsafe(start)
        return handle

    async def _drive(
        self, handle: RequestHandle, tokens: list[int], params: SamplingParams
    ) -> None:
        """Stream one request from a replica to `handle`, resuming elsewhere if one dies."""
        delivered: list[int] = []
        started = time.perf_counter()
        if handle.cancelled:  # before its task existed
            self._finish(handle, self._ended(handle, "cancelled", tokens, delivered, started))
            return
        first_token_at: float | None = None
        final: Finished | None = None
        served_by = ""
        try:
            while final is None:
                rest = params
                if delivered and params.max_tokens is not None:
                    rest = replace(params, max_tokens=params.max_tokens - len(delivered))
                stream = self._handle.options(stream=True).generate.remote(tokens + delivered, rest)
                try:
                    async for batch in stream:
                        for ev in batch:
                            if isinstance(ev, Served):
                                served_by = ev.replica
                                continue
                            if isinstance(ev, Finished):
                                final = ev
                                break
                            if ev.tokens and first_token_at is None:
                                first_token_at = time.perf_counter()
                            delivered.extend(ev.tokens)
                            self._push(handle, ev)
                except _failover_errors() as e:
                    if handle.failovers >= MAX_FAILOVERS:
                        raise
                    handle.failovers += 1
                    self.failovers += 1
                    log.warning(
                        "model %s: a replica was lost mid-stream (%s); resuming request %d on "
                        "another after %d tokens",
                        self.name,
                        type(e).__name__,
                        handle.id,
                        len(delivered),
                    )
                    await asyncio.sleep(FAILOVER_PAUSE_S)
                finally:
                    with contextlib.suppress(Exception):
                        stream.cancel()
            ev = self._merged(final, tokens, delivered, started, first_token_at)
            with self._lock:
                self.requests_by_replica[served_by] += 1
                self.cache_hits_by_replica[served_by] += ev.usage.cached_tokens > 0
            self._finish(handle, ev)
        except asyncio.CancelledError:
            self._finish(handle, self._ended(handle, "cancelled", tokens, delivered, started))
        except Exception as e:  # the cluster failed this request: say so, as an engine would
            log.warning("model %s: request %d failed on the cluster: %s", self.name, handle.id, e)
            ended = self._ended(handle, "error", tokens, delivered, started)
            self._finish(handle, replace(ended, error=f"the cluster failed the request: {e}"))

    def _merged(
        self,
        final: Finished,
        tokens: list[int],
        delivered: list[int],
        started: float,
        first_token_at: float | None,
    ) -> Finished:
        """The replica's Finished, in terms of the client's request (across any resumes)."""
        if len(delivered) == final.usage.completion_tokens:
            return final  # no resume: the replica's own figures
        now = time.perf_counter()
        ttft = (first_token_at or now) - started
        usage = Usage(len(tokens), len(delivered), min(final.usage.cached_tokens, len(tokens)))
        decode = (len(delivered) - 1) / (now - first_token_at) if first_token_at else 0.0
        timings = Timings(0.0, ttft, now - started, final.timings.prefill_tokens_per_s, decode)
        return replace(final, usage=usage, timings=timings)

    def _ended(
        self, handle: RequestHandle, reason: Any, tokens: list[int], delivered: list[int], t0: float
    ) -> Finished:
        elapsed = time.perf_counter() - t0
        return Finished(
            reason, Usage(len(tokens), len(delivered), 0), Timings(0.0, 0.0, elapsed, 0.0, 0.0)
        )

    def _push(self, handle: RequestHandle, ev: Delta | Finished) -> None:
        """Hand an event to its consumer; every stream's events of one turn of the cluster
        loop reach the server's loop in one wake-up, as the engine's do once per step."""
        handle._push(ev)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.cluster.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._outbox.flush()

    def _finish(self, handle: RequestHandle, ev: Finished) -> None:
        with self._lock:
            self._running -= 1
            self._generated += ev.usage.completion_tokens
            self._prompt_cached += ev.usage.cached_tokens
            self._prompt_computed += ev.usage.prompt_tokens - ev.usage.cached_tokens
            if ev.usage.cached_tokens:
                self._hits += 1
            else:
                self._misses += 1
        self.last_active = time.monotonic()
        self._push(handle, ev)

    # -- the rest of the engine interface ------------------------------------------------------

    def embed(self, texts: list[str], *, normalize: bool = True) -> list[list[float]]:
        return self._handle.embed.remote(texts).result(timeout_s=300)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                model=self.name,
                slots=self.n_slots,
                running=self._running,
                queued=0,
                max_queue=self.config.max_queue,
                n_ctx_per_slot=self.n_ctx_per_slot,
                tokens_generated=self._generated,
                prompt_tokens_computed=self._prompt_computed,
                prompt_tokens_cached=self._prompt_cached,
                prompt_cache_hits=self._hits,
                prompt_cache_misses=self._misses,
                compute_seconds=0.0,
            )

    @property
    def busy(self) -> bool:
        return self._running > 0

    def close(self) -> None:
        self.cluster.undeploy(self.name)
        self.model.close()

    def __enter__(self) -> ClusterEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClusterEngines:
    """The model pool's engine factory under `serve --cluster`: one connection to the cluster,
    one `ClusterEngine` (a Serve application) per loaded model; closed with the pool."""

    def __init__(self, plan: ClusterPlan) -> None:
        self.cluster = RayCluster(plan)

    def __call__(
        self,
        path: str | os.PathLike[str],
        config: EngineConfig | None = None,
        *,
        name: str | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> ClusterEngine:
        return ClusterEngine(
            path, config, name=name, prompt_cache=prompt_cache, cluster=self.cluster
        )

    def close(self) -> None:
        self.cluster.close()
