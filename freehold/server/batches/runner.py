"""The server's one batch runner: a task on the event loop that runs batches' lines through the
same `GenerationService` as interactive requests (admission, engine, ledger, audit, metrics),
each billed to the key that created its batch.

Batch work is low priority. A line starts only while its model has a free slot (nothing queued
behind interactive requests), and at most half the model's slots (at least one) run batch lines
at once, so interactive requests always find room. A line refused for load (429, 503) is simply
tried again later. State is in SQLite: after a restart, lines with a stored result are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from freehold.server.access import served_model
from freehold.server.auth import ApiKey
from freehold.server.batches.lines import LineRefused, door_request
from freehold.server.batches.protocol import LEDGER_ENDPOINT, LineError, LineResponse, OutputLine
from freehold.server.batches.store import Batch, BatchStore, LineResult, PendingLine, new_id
from freehold.server.errors import APIError, from_engine
from freehold.server.generation import Generation, GenerationService, Origin
from freehold.server.openai import chat, completions, embeddings
from freehold.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from freehold.server.services import Services

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # without a wake-up (a new batch, a finished line), look again this often
STOP_WAIT_S = 10.0  # on shutdown, how long cancelled lines get to settle
UNREADY = ""  # the model name counted for lines whose model is not ready (or not served)
RETRYABLE = (429, 503)  # refusals for load (rate limit, capacity, loading, draining): wait


@dataclass
class _Running:
    batch_id: str
    model: str
    task: asyncio.Task[None]
    gen: Generation | None = None


@dataclass
class BatchRunner:
    store: BatchStore
    services: Services
    generation: GenerationService
    _running: dict[tuple[str, int], _Running] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _paused_until: dict[str, float] = field(default_factory=dict)  # batch id -> monotonic time
    _loop_task: asyncio.Task[None] | None = None
    _stopping: bool = False

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="freehold-batches")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Stop scheduling; cancel running lines (they stay pending and rerun after restart)."""
        self._stopping = True
        self.wake()
        for r in self._running.values():
            if r.gen is not None:
                r.gen.cancel()
        tasks = [r.task for r in self._running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        for t in tasks:
            t.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._tick()
            except Exception:  # one bad tick must not stop every batch for good
                log.exception("batch runner tick failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)

    # -- scheduling ----------------------------------------------------------------------------

    async def _tick(self) -> None:
        for batch in await asyncio.to_thread(self.store.active):
            if self._stopping:
                return
            if batch.status == "validating":
                # Lines were checked when it was created; unless it was cancelled meanwhile.
                if not self.store.set_status(batch.id, "in_progress", only_from=("validating",)):
                    continue
                batch.status = "in_progress"
            if batch.status == "in_progress" and time.time() > batch.expires_at:
                await self._end_when_idle(batch, "expired")
            elif batch.status == "cancelling":
                await self._end_when_idle(batch, "cancelled")
            elif batch.status == "finalizing":  # the server stopped while writing the files
                await self._end_when_idle(batch, "completed")
            elif batch.status == "in_progress":
                if not self._dispatch(batch):
                    await self._end_when_idle(batch, "completed")

    async def _end_when_idle(self, batch: Batch, status: str) -> None:
        if any(r.batch_id == batch.id for r in self._running.values()):
            return
        await asyncio.to_thread(self.store.finalize, batch.id, batch.owner, status)
        self._paused_until.pop(batch.id, None)

    def _dispatch(self, batch: Batch) -> bool:
        """Start what may start of `batch`'s pending lines; False when none is left at all."""
        if time.monotonic() < self._paused_until.get(batch.id, 0.0):
            return True
        mine = {line for (b, line) in self._running if b == batch.id}
        todo = self.store.pending(batch.id, mine, limit=8)
        if not todo and not mine:
            return False
        for line in todo:
            model = self._room_for(line)
            if model is None:
                break
            key = (batch.id, line.line)
            task = asyncio.create_task(self._run(batch, line))
            self._running[key] = _Running(batch.id, model, task)
        return True

    def _room_for(self, line: PendingLine) -> str | None:
        """The line's served model if a batch line may start on it now, else None."""
        name = line.body.get("model")
        s = self.services
        running = Counter(r.model for r in self._running.values())
        try:
            model = served_model(s, name if isinstance(name, str) else "")
            engine = s.registry.engine(model)
        except APIError:
            # Not served, loading or failed: admission says which, one line at a time.
            return None if running[UNREADY] else UNREADY
        share = max(1, engine.n_slots // 2)
        free_slot = s.registry.inflight(model) < engine.n_slots
        return model if running[model] < share and free_slot else None

    # -- one line ------------------------------------------------------------------------------

    async def _run(self, batch: Batch, line: PendingLine) -> None:
        request_id = new_id("batch_req")
        origin = Origin(request_id, f"batch:{batch.id}")
        try:
            result = await self._answer(batch, line, origin)
            if result is not None:
                await asyncio.to_thread(self.store.save_result, batch.id, line.line, result)
        except Exception:
            log.exception("batch %s line %d failed unexpectedly", batch.id, line.line)
        finally:
            self._running.pop((batch.id, line.line), None)
            self.wake()

    async def _answer(self, batch: Batch, line: PendingLine, origin: Origin) -> LineResult | None:
        """The line's result; None when it was refused for load and should be tried later."""
        try:
            key = self._creator(batch.owner)
            req = door_request(batch.endpoint, line.body)
            body = await self._call(batch, line, req, key, origin)
        except LineRefused as e:
            return _refused(line, origin, str(e))
        except Exception as e:
            err = e if isinstance(e, APIError) else from_engine(e)
            if err.status in RETRYABLE:
                self._pause(batch.id, err)
                return None
            response = LineResponse(
                status_code=err.status, request_id=origin.request_id, body=err.body()
            )
            return LineResult(err.status, _output(line, origin, response))
        response = LineResponse(status_code=200, request_id=origin.request_id, body=body)
        return LineResult(200, _output(line, origin, response), **_tokens(body))

    async def _call(
        self,
        batch: Batch,
        line: PendingLine,
        req: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
        key: ApiKey | None,
        origin: Origin,
    ) -> dict[str, Any]:
        endpoint = LEDGER_ENDPOINT[batch.endpoint]
        if isinstance(req, EmbeddingRequest):
            return await embeddings.response_body(self.generation, origin, key, req, endpoint)
        door = chat if isinstance(req, ChatCompletionRequest) else completions
        spec = door.generation_request(req)  # type: ignore[arg-type]
        spec.endpoint = endpoint
        gen = await self.generation.start(origin, key, spec)
        running = self._running.get((batch.id, line.line))
        if running is not None:
            running.gen = gen  # so that stop() can cancel it
        await self.generation.collect(gen)
        return door.response_body(gen, req)  # type: ignore[arg-type]

    def _creator(self, owner: str) -> ApiKey | None:
        """The key that created a batch, as it is now (its limits and models may have changed)."""
        if not owner:
            return None  # made while the server had no keys
        for key in self.services.keys.list():
            if key.name == owner:
                return key
        raise APIError(
            401, f"the key {owner!r} that created this batch was revoked", code="invalid_api_key"
        )

    def _pause(self, batch_id: str, err: APIError) -> None:
        if self._stopping:
            return
        try:
            wait = float(err.headers.get("Retry-After", "1"))
        except ValueError:
            wait = 1.0
        self._paused_until[batch_id] = time.monotonic() + min(max(wait, 0.2), 60.0)


def _output(line: PendingLine, origin: Origin, response: LineResponse) -> OutputLine:
    return OutputLine(id=origin.request_id, custom_id=line.custom_id, response=response)


def _refused(line: PendingLine, origin: Origin, why: str) -> LineResult:
    error = LineError(code="invalid_request", message=f"line {line.line}: {why}")
    return LineResult(400, OutputLine(id=origin.request_id, custom_id=line.custom_id, error=error))


def _tokens(body: dict[str, Any]) -> dict[str, int]:
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return {
        "prompt_tokens": int(usage.get("prompt_tokens", 0)),
        "cached_tokens": int(details.get("cached_tokens", 0)),
        "completion_tokens": int(usage.get("completion_tokens", 0)),
    }
