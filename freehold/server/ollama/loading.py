"""Ollama's model lifetime on top of the registry: a request waits while its model loads (up to
--load-wait, as on every door), and `keep_alive: 0` unloads the model once it is idle.

Served models otherwise stay loaded: any other keep_alive is accepted and changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi.responses import Response

from freehold.engine import Engine
from freehold.server.auth import ApiKey
from freehold.server.ollama.facts import model_facts
from freehold.server.services import Services

IDLE_WAIT_S = 60.0  # how long an unload waits for other requests on the model to finish
_POLL_S = 0.05


def loaded_engine(s: Services, mid: str) -> Engine | None:
    """The model's engine if it is loaded now; never starts a load."""
    if s.registry.ready().get(mid) != "loaded":
        return None
    return s.registry.engine(mid)


async def wait_loaded(s: Services, key: ApiKey | None, mid: str) -> float:
    """Load the model if it is not loaded (or wait for a load under way); seconds waited.

    Only for a model this key may use on a server that is not draining: everything else goes
    straight to admission, which refuses it and accounts for the refusal. A failed load is
    left for admission to report too."""
    if s.draining or not s.registry.known(mid) or (key is not None and not key.allows(mid)):
        return 0.0
    if s.registry.load(mid).done():
        return 0.0
    started = time.perf_counter()
    await s.registry.wait_loaded(mid, s.settings.load_wait_s)
    return time.perf_counter() - started


def served_context(s: Services, mid: str) -> int:
    """Tokens per request for a model: the loaded engine's, else what it will be loaded with."""
    engine = loaded_engine(s, mid)
    if engine is not None:
        return engine.n_ctx_per_slot
    # Sized as Engine does: the configured per-slot context, else min(trained, 4096), in 256s.
    cfg = s.registry.pool.config
    trained = model_facts(s, mid).info.context_length or 4096
    n = (cfg.n_ctx_per_slot if cfg else None) or min(trained, 4096)
    return -(-n // 256) * 256


async def unload_when_idle(s: Services, mid: str) -> None:
    """Unload a model once nothing runs on it (keep_alive 0); give up after IDLE_WAIT_S."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while time.monotonic() < deadline:
        engine = loaded_engine(s, mid)
        if engine is None:
            return
        if not engine.busy and s.registry.inflight(mid) == 0:
            await asyncio.to_thread(s.registry.pool.unload, mid)
            return
        await asyncio.sleep(_POLL_S)


def unload_before_last_line(response: Response, s: Services, mid: str, last: list[bytes]) -> None:
    """Make a streamed response unload its model before sending its final line (`last[0]`,
    filled in by the door's tail), so a client that reads "done" then lists /api/ps sees the
    model gone."""
    body = response.body_iterator  # type: ignore[attr-defined]

    async def wrapped() -> AsyncIterator[bytes]:
        unloaded = False
        async for chunk in body:
            if last and chunk is last[0]:
                await unload_when_idle(s, mid)
                unloaded = True
            yield chunk
        if not unloaded:
            await unload_when_idle(s, mid)

    response.body_iterator = wrapped()  # type: ignore[attr-defined]
