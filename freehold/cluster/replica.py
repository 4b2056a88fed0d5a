"""One replica of a served model on a Ray cluster: Freehold's own engine inside a Serve actor.

The gateway tokenizes and templates; a replica only takes token ids and sampling parameters,
runs them on its `Engine` (continuous batching, prefix cache, adapters) and streams the events
back. Events are coalesced: a stream sends at most one message per `window_s` (an event after
a quiet window, such as the first token, goes at once), so the per-message cost of a Serve
stream (~0.5-1 ms) is paid at most 20 times a second per stream, not once per token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from freehold.cluster import shipping
from freehold.engine import Engine, EngineConfig, Event, Finished, PromptCache
from freehold.engine.sampling import SamplingParams

COALESCE_S = 0.05  # at most 20 messages a second per stream


@dataclass(frozen=True)
class Served:
    """The first item of every stream: which replica (and node) took the request."""

    replica: str
    node: str


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica needs to start, sent by the gateway (picklable)."""

    model: str
    weights: shipping.Blob
    adapters: tuple[shipping.Blob, ...]
    gateway_paths: dict[str, str]  # sha256 -> path on the gateway's node
    gateway_node: str
    config: EngineConfig
    cache_ram_bytes: int | None
    node_cache: str
    window_s: float = COALESCE_S


class EngineReplica:
    """The Serve deployment class (wrapped with `serve.deployment` by the cluster)."""

    def __init__(self, spec: ReplicaSpec, source: Any) -> None:
        import ray
        from ray import serve

        self.node_id = ray.get_runtime_context().get_node_id()
        self.served = Served(serve.get_replica_context().replica_id.unique_id, self.node_id)
        self.spec = spec
        weights = self._local(spec.weights, source)
        adapters = tuple(str(self._local(a, source)) for a in spec.adapters)
        config = replace(spec.config, adapters=adapters)
        self.engine = Engine(
            weights, config, name=spec.model, prompt_cache=PromptCache(spec.cache_ram_bytes)
        )

    def _local(self, blob: shipping.Blob, source: Any) -> Path:
        """The file on this node: the gateway's own on its node, else fetched and verified."""
        if self.node_id == self.spec.gateway_node:
            return Path(self.spec.gateway_paths[blob.sha256])
        import ray

        def read(index: int) -> tuple[bytes, str]:
            return ray.get(source.chunk.remote(blob.sha256, index))

        return shipping.fetch(blob, read, Path(self.spec.node_cache))

    def facts(self) -> dict[str, int]:
        """What the gateway's admission needs: slots and context per slot."""
        return {"n_slots": self.engine.n_slots, "n_ctx_per_slot": self.engine.n_ctx_per_slot}

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.engine.embed(texts)

    async def generate(
        self, tokens: list[int], params: SamplingParams
    ) -> AsyncIterator[list[Event | Served]]:
        """Who serves it, then the events of one completion, coalesced; cancelling the
        stream frees the slot."""
        handle = self.engine.submit(tokens, params)
        try:
            yield [self.served]
            async for batch in coalesced(aiter(handle), self.spec.window_s):
                yield batch
        finally:
            handle.cancel()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.close()


async def coalesced(events: AsyncIterator[Event], window_s: float) -> AsyncIterator[list[Event]]:
    """`events` in lists, at most one list per `window_s`: an event that comes after a quiet
    window goes at once (the first token, or tokens slower than the window); faster ones wait
    for the window to close and travel together. The last event is never held back."""
    loop = asyncio.get_running_loop()
    batch: list[Event] = []
    last_sent = -window_s
    pending: asyncio.Future[Event] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            timeout = max(last_sent + window_s - loop.time(), 0.0) if batch else None
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if done:
                try:
                    batch.append(pending.result())
                except StopAsyncIteration:
                    break
                pending = None
            due = loop.time() >= last_sent + window_s
            if batch and (due or isinstance(batch[-1], Finished)):
                yield batch
                batch, last_sent = [], loop.time()
        if batch:
            yield batch
    finally:
        if pending is not None:
            pending.cancel()
