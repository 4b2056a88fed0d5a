"""What callers see of a request: events, usage, timings, results, and the handle to stream them.

A `RequestHandle` is filled by the scheduler thread and read by one consumer, either with a plain
`for event in handle` (blocking, thread-safe) or `async for event in handle` (asyncio-safe: the
scheduler hands events to the loop with `call_soon_threadsafe`, once per step through an
`Outbox`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal

from freehold.errors import FreeholdError

FinishReason = Literal["stop", "length", "cancelled", "error"]


class QueueFull(FreeholdError):
    """The engine's admission queue is full; the caller should retry later (HTTP 503/429)."""

    exit_code = 4


class ContextOverflow(FreeholdError):
    """A prompt does not fit in the context window."""

    exit_code = 2


class EngineClosed(FreeholdError):
    """The engine was shut down (model unloaded) before or while the request ran."""


class RequestTimeout(FreeholdError):
    """Waiting for a request's result took longer than the caller allowed."""


@dataclass(frozen=True)
class TopLogprob:
    token: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the model, and the best alternatives."""

    token: int
    text: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache, not recomputed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queued_s: float  # submit -> admitted into a slot
    ttft_s: float  # submit -> first generated token
    total_s: float  # submit -> finished
    prefill_tokens_per_s: float  # prompt tokens actually computed / prefill time
    decode_tokens_per_s: float  # (completion tokens - 1) / time after the first token


@dataclass(frozen=True)
class Delta:
    """Newly generated text. `text` may be empty while a possible stop string is held back."""

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of every request."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: str | None = None
    stop_string: str | None = None  # the stop string that ended it ("stop" by EOS: None)


Event = Delta | Finished


@dataclass
class Completion:
    """A whole result, collected from a handle's events."""

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None


_END = object()


def _deliver(batch: list[tuple[asyncio.Queue[object], object]]) -> None:
    for q, ev in batch:
        q.put_nowait(ev)


class Outbox:
    """Events for asyncio consumers, handed to each event loop in one wake-up per step.

    Waking a loop once per token per stream costs a pipe write and a thread switch each; on a
    machine whose cores run the model's compute threads, those switches stall a decode step.
    Used by the scheduler thread only: `put` during a step, `flush` after it.
    """

    def __init__(self) -> None:
        self._batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[object], object]]]
        self._batches = {}

    def put(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[object], ev: object) -> None:
        self._batches.setdefault(loop, []).append((q, ev))

    def flush(self) -> None:
        batches, self._batches = self._batches, {}
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the consumer's loop is gone; nobody is listening
                pass


class RequestHandle:
    """One submitted request: iterate its events (sync or async), cancel it, or wait for it."""

    def __init__(self, request_id: int, wake: threading.Event, outbox: Outbox) -> None:
        self.id = request_id
        self.submitted_at = time.perf_counter()
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue[object] | None = None
        self._cancel = threading.Event()
        self._finished: Finished | None = None
        self._wake = wake  # the engine's: cancel() wakes its scheduler
        self._outbox = outbox  # the engine's: async events go out once per step
        self.seed: int | None = None  # the sampling seed actually used
        self.prompt_tokens = 0  # the prompt's length in tokens (known at submit)
        self.failovers = 0  # times a cluster resumed it on another replica (a node died)

    # -- scheduler side ------------------------------------------------------------------------

    def _push(self, ev: Event) -> None:
        with self._lock:
            if isinstance(ev, Finished):
                self._finished = ev
            if self._loop is not None and self._aqueue is not None:
                self._outbox.put(self._loop, self._aqueue, ev)
            else:
                self._sync.put(ev)

    # -- consumer side -------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop generating; the slot is freed within one decode step. Idempotent."""
        self._cancel.set()
        self._wake.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._finished is not None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iteration; `timeout` bounds the wait for each event (RequestTimeout)."""
        while True:
            try:
                ev = self._sync.get(timeout=timeout)
            except queue.Empty:
                raise RequestTimeout(
                    f"no output from request {self.id} for {timeout}s; the engine may be overloaded"
                ) from None
            yield ev  # type: ignore[misc]
            if isinstance(ev, Finished):
                return

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._aqueue is None:
                self._aqueue = asyncio.Queue()
                self._loop = loop
                # Move anything produced before the consumer attached.
                while True:
                    try:
                        self._aqueue.put_nowait(self._sync.get_nowait())
                    except queue.Empty:
                        break
        assert self._aqueue is not None
        while True:
            ev = await self._aqueue.get()
            yield ev  # type: ignore[misc]
            if isinstance(ev, Finished):
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Collect all events into a `Completion` (blocking)."""
        text: list[str] = []
        toks: list[int] = []
        lps: list[TokenLogprob] = []
        for ev in self.events(timeout):
            if isinstance(ev, Delta):
                text.append(ev.text)
                toks.extend(ev.tokens)
                lps.extend(ev.logprobs)
            else:
                return Completion(
                    text="".join(text),
                    tokens=toks,
                    finish_reason=ev.finish_reason,
                    usage=ev.usage,
                    timings=ev.timings,
                    logprobs=lps,
                    error=ev.error,
                )
        raise RuntimeError("request ended without a Finished event")  # pragma: no cover


@dataclass(frozen=True)
class EngineStats:
    """What a server's /metrics or /health wants to know about one loaded model."""

    model: str
    slots: int
    running: int  # requests holding a slot
    queued: int  # requests waiting for a slot
    max_queue: int
    n_ctx_per_slot: int
    tokens_generated: int
    prompt_tokens_computed: int
    prompt_tokens_cached: int
    compute_seconds: float = 0.0  # inside llama_decode since load: its rate is how busy it is
    prompt_cache_hits: int = 0  # requests whose prefix was restored from the host-memory cache
    prompt_cache_misses: int = 0  # requests for which that cache held nothing longer

    @property
    def cached_share(self) -> float:
        """Share of prompt tokens served from cache rather than computed, since load."""
        total = self.prompt_tokens_cached + self.prompt_tokens_computed
        return self.prompt_tokens_cached / total if total else 0.0
