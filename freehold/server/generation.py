"""The one generation service behind every front door.

A door (OpenAI chat and completions, OpenAI Responses, Anthropic Messages, Ollama) parses its
request into a `GenerationRequest`: the model as the client named it, and one `Job` per engine
request (chat messages or a raw prompt, with its `SamplingParams`). The service then runs one
straight line for all of them:

    admit (draining, model, key's allow-list, rpm/tpm, capacity)
      -> submit every job to the engine (all or none)
      -> collect, or stream through the door's own renderer
      -> account once: ledger, audit log, metrics, the key's token window

and hands the finished `Generation` back to the door, which renders it in its own format.
Nothing here knows any API's wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from freehold.engine import (
    Delta,
    Engine,
    Event,
    Finished,
    RequestHandle,
    SamplingParams,
    TokenLogprob,
)
from freehold.server.access import checked_engine, served_model
from freehold.server.audit import prompt_digest
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError, from_engine
from freehold.server.ledger import UsageRecord, now_iso
from freehold.server.services import Services, client_address

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
SETTLE_TIMEOUT_S = 5.0


# -- what a door asks for ----------------------------------------------------------------------


@dataclass
class Job:
    """One engine request: chat `messages` through the model's template, or a raw `prompt`."""

    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    add_special: bool = True  # raw prompts: let the tokenizer add BOS
    group: int = 0  # which prompt it answers: a prompt's tokens count once however many answer

    def submit(self, engine: Engine) -> RequestHandle:
        if self.messages is not None:
            return engine.chat(self.messages, self.params, tools=self.tools)
        assert self.prompt is not None, "a job needs messages or a prompt"
        return engine.submit(self.prompt, self.params, add_special=self.add_special)


@dataclass
class GenerationRequest:
    endpoint: str  # the ledger's and metrics' name for the door's route
    model: str  # as the client named it: a served id or an alias
    jobs: list[Job]
    user: str | None = None
    audit_prompt: Any = None  # hashed for the audit log; kept only with --log-content


@dataclass(frozen=True)
class Origin:
    """Where a generation comes from, apart from its key: an HTTP request, or a batch line
    (which has no connection, so nothing to watch for a disconnect)."""

    request_id: str
    client: str | None
    receive: Receive | None = None  # the HTTP request's messages: to notice its client leave

    @classmethod
    def of(cls, request: Request | Origin) -> Origin:
        if isinstance(request, Origin):
            return request
        return cls(request.state.request_id, client_address(request), request.receive)


# -- accounting --------------------------------------------------------------------------------


@dataclass
class Totals:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class RequestContext:
    """One API request from admission to its last byte; reported once when it ends."""

    services: Services
    request_id: str
    endpoint: str
    model: str
    key: ApiKey | None
    client: str | None
    user: str | None
    prompt_sha256: str
    prompt: Any = None  # kept only with --log-content
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_at: float | None = None
    totals: Totals = field(default_factory=Totals)
    _done: bool = False

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def finish(self, status: int, completion_text: str | None = None) -> None:
        """Account for the request exactly once, whatever path it ended on."""
        if self._done:
            return
        self._done = True
        s = self.services
        duration = time.perf_counter() - self.started
        # Only served model names become labels: clients must not mint new time series.
        label = self.model if s.registry.known(self.model) else "unknown"
        s.metrics.requests.labels(label, self.endpoint, str(status)).inc()
        s.metrics.duration.labels(label).observe(duration)
        t = self.totals
        if self.key is not None:
            s.limiter.charge(self.key, t.prompt_tokens + t.completion_tokens)
        s.ledger.record(self._usage_record(status, duration))
        s.audit.write(self._audit_entry(status, duration, completion_text))

    def _usage_record(self, status: int, duration: float) -> UsageRecord:
        t, ttft = self.totals, self.ttft_s
        return UsageRecord(
            request_id=self.request_id,
            ts=now_iso(),
            key_name=self.key.name if self.key else None,
            model=self.model,
            endpoint=self.endpoint,
            prompt_tokens=t.prompt_tokens,
            cached_tokens=t.cached_tokens,
            completion_tokens=t.completion_tokens,
            ttft_ms=None if ttft is None else ttft * 1000,
            duration_ms=duration * 1000,
            status=status,
            user=self.user,
        )

    def _audit_entry(
        self, status: int, duration: float, completion_text: str | None
    ) -> dict[str, Any]:
        t = self.totals
        entry: dict[str, Any] = {
            "request_id": self.request_id,
            "time": now_iso(),
            "key": self.key.name if self.key else None,
            "client": self.client,
            "endpoint": self.endpoint,
            "model": self.model,
            "user": self.user,
            "status": status,
            "prompt_tokens": t.prompt_tokens,
            "cached_tokens": t.cached_tokens,
            "completion_tokens": t.completion_tokens,
            "duration_ms": round(duration * 1000, 1),
            "prompt_sha256": self.prompt_sha256,
        }
        if self.services.audit.log_content:
            entry["prompt"] = self.prompt
            entry["completion"] = completion_text
        return entry


# -- one generation ----------------------------------------------------------------------------


@dataclass
class Choice:
    index: int
    job: Job
    handle: RequestHandle
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0
    finished: Finished | None = None

    @property
    def group(self) -> int:
        return self.job.group

    @property
    def output(self) -> str:
        return "".join(self.text)


class Generation:
    """The engine requests behind one API request: their merged events, and their end."""

    def __init__(self, ctx: RequestContext, engine: Engine, origin: Origin, reserved: int) -> None:
        self.ctx = ctx
        self.engine = engine
        self.origin = origin
        self.choices: list[Choice] = []
        self.reserved = reserved  # places taken in the model's admission count
        self.status = CLIENT_CLOSED  # until the request completes one way or another
        self.client_gone = False
        self._closed = False

    @property
    def model(self) -> str:
        """The served model's id (an alias the client sent is resolved)."""
        return self.ctx.model

    # -- events --------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[tuple[Choice, Event]]:
        """Every choice's events as they come; updates each choice's text and counts."""
        if len(self.choices) == 1:
            c = self.choices[0]
            async for ev in c.handle:
                self._note(c, ev)
                yield c, ev
            return
        queue: asyncio.Queue[tuple[Choice, Event]] = asyncio.Queue()

        async def pump(c: Choice) -> None:
            async for ev in c.handle:
                queue.put_nowait((c, ev))

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            remaining = len(self.choices)
            while remaining:
                c, ev = await queue.get()
                self._note(c, ev)
                if isinstance(ev, Finished):
                    remaining -= 1
                yield c, ev
        finally:
            for t in tasks:
                t.cancel()

    def _note(self, c: Choice, ev: Event) -> None:
        if isinstance(ev, Delta):
            if ev.tokens:
                c.tokens += len(ev.tokens)
                self.ctx.mark_first_token()
            if ev.text:
                c.text.append(ev.text)
            if ev.logprobs:
                c.logprobs.extend(ev.logprobs)
        else:
            c.finished = ev

    def raise_errors(self) -> None:
        if self.client_gone:
            raise APIError(CLIENT_CLOSED, "the client closed the request", code="client_closed")
        for c in self.choices:
            f = c.finished
            if f is not None and f.finish_reason == "error":
                raise APIError(500, f"generation failed: {f.error}", code="engine_error")
            if f is not None and f.finish_reason == "cancelled":
                raise APIError(503, "the request was cancelled", code="cancelled")

    def cancel(self) -> None:
        for c in self.choices:
            if c.finished is None:
                c.handle.cancel()

    # -- totals --------------------------------------------------------------------------------

    @property
    def prompt_tokens(self) -> int:
        return self.ctx.totals.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.ctx.totals.completion_tokens

    @property
    def cached_tokens(self) -> int:
        return self.ctx.totals.cached_tokens

    # -- close ---------------------------------------------------------------------------------

    async def close(self, status: int | None = None) -> None:
        """Cancel what still runs, wait briefly for final usage, release capacity, account."""
        if self._closed:
            return
        if status is not None:
            self.status = status
        self.cancel()
        pending = [c for c in self.choices if c.finished is None]
        if pending:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._settle(pending), SETTLE_TIMEOUT_S)
        self.finish_now(self.status)

    async def _settle(self, pending: list[Choice]) -> None:
        for c in pending:
            async for ev in c.handle:
                self._note(c, ev)

    def finish_now(self, status: int) -> None:
        if self._closed:
            return
        self._closed = True
        t = self.ctx.totals
        seen_groups: set[int] = set()
        metrics = self.ctx.services.metrics
        for c in self.choices:
            f = c.finished
            t.completion_tokens += f.usage.completion_tokens if f else c.tokens
            if f is None:
                continue
            if c.group not in seen_groups:
                seen_groups.add(c.group)
                t.prompt_tokens += f.usage.prompt_tokens
                t.cached_tokens += f.usage.cached_tokens
            decode_s = max(f.timings.total_s - f.timings.ttft_s, 0.0)
            ttft = f.timings.ttft_s if f.usage.completion_tokens else None
            metrics.observe_generation(self.ctx.model, f.usage, ttft, decode_s)
        s = self.ctx.services
        s.registry.release(self.ctx.model, self.reserved)
        text = "".join(c.output for c in self.choices) if s.audit.log_content else None
        self.ctx.finish(status, text)
        self._audit_failovers()

    def _audit_failovers(self) -> None:
        """One `failover` event per choice a cluster resumed on another replica."""
        for c in self.choices:
            if c.handle.failovers:
                self.ctx.services.metrics.failovers.labels(self.ctx.model).inc(c.handle.failovers)
                self.ctx.services.audit.write(
                    {
                        "event": "failover",
                        "request_id": self.ctx.request_id,
                        "time": now_iso(),
                        "key": self.ctx.key.name if self.ctx.key else None,
                        "model": self.ctx.model,
                        "choice": c.index,
                        "resumes": c.handle.failovers,
                        "completion_tokens": c.tokens,
                    }
                )


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


# -- the service -------------------------------------------------------------------------------


class GenerationService:
    """Admits, runs and accounts for every door's generations (one per app)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def admit(
        self,
        request: Request | Origin,
        key: ApiKey | None,
        *,
        endpoint: str,
        model: str,
        places: int,
        user: str | None = None,
        audit_prompt: Any = None,
    ) -> tuple[Engine, RequestContext]:
        """Check draining, model, permission and limits; reserve `places`; start accounting.

        Whoever is admitted must end with `ctx.finish` (a `Generation` does it on close) and
        release the places. Refusals are in the ledger and audit log too, with 0 tokens.
        """
        s = self.services
        origin = Origin.of(request)
        ctx = RequestContext(
            services=s,
            request_id=origin.request_id,
            endpoint=endpoint,
            model=model,
            key=key,
            client=origin.client,
            user=user,
            prompt_sha256=prompt_digest(audit_prompt),
            prompt=audit_prompt if s.audit.log_content else None,
        )
        try:
            ctx.model = served_model(s, model)
            engine = await checked_engine(s, key, ctx.model)
            self._charge_request(key, ctx.model)
            s.registry.admit(ctx.model, engine, places)
        except APIError as e:
            ctx.finish(e.status)
            raise
        return engine, ctx

    def _charge_request(self, key: ApiKey | None, model: str) -> None:
        if key is None:
            return
        s = self.services
        wait = s.limiter.admit(key)
        if wait is not None:
            s.metrics.rejected.labels(model, "rate_limit").inc()
            raise APIError(
                429,
                f"the key {key.name!r} is over its rate limit; retry in {wait:.0f}s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )

    async def start(
        self, request: Request | Origin, key: ApiKey | None, spec: GenerationRequest
    ) -> Generation:
        """Admit `spec` and submit all of its jobs (all or none)."""
        count = len(spec.jobs)
        origin = Origin.of(request)
        engine, ctx = await self.admit(
            origin,
            key,
            endpoint=spec.endpoint,
            model=spec.model,
            places=count,
            user=spec.user,
            audit_prompt=spec.audit_prompt,
        )
        gen = Generation(ctx, engine, origin, count)
        default_limit = self.services.settings.max_tokens
        try:
            for i, job in enumerate(spec.jobs):
                if job.params.max_tokens is None:
                    job.params.max_tokens = default_limit  # None: to the end of the context
                # Off the event loop: rendering the template and tokenizing take time for a
                # long prompt (half a second for 1 MB), and other requests' streams must flow.
                handle = await run_in_threadpool(job.submit, engine)
                gen.choices.append(Choice(i, job, handle))
        except Exception as e:
            gen.cancel()
            err = e if isinstance(e, APIError) else from_engine(e)
            gen.finish_now(err.status)
            raise err from None
        return gen

    async def collect(self, gen: Generation) -> Generation:
        """Run every job to its end and account; a failure is raised as its APIError.

        A client that disconnects meanwhile cancels the generation.
        """
        receive = gen.origin.receive
        watcher = asyncio.create_task(_cancel_on_disconnect(gen, receive)) if receive else None
        try:
            async for _ in gen.events():
                pass
            gen.raise_errors()
        except Exception as e:
            err = e if isinstance(e, APIError) else from_engine(e)
            await gen.close(err.status)
            raise err from None
        finally:
            if watcher is not None:
                watcher.cancel()
        await gen.close(200)
        return gen

    async def embed(
        self,
        request: Request | Origin,
        key: ApiKey | None,
        *,
        endpoint: str,
        model: str,
        texts: list[str],
        user: str | None = None,
        check_width: Callable[[int], None] | None = None,
    ) -> Embeddings:
        """Pooled embeddings of `texts`, admitted and accounted like a generation.

        `check_width(n_embd)` lets a door refuse a width it cannot serve before any work."""
        engine, ctx = await self.admit(
            request, key, endpoint=endpoint, model=model, places=0, user=user, audit_prompt=texts
        )
        try:
            if check_width is not None:
                check_width(engine.model.n_embd)
            # Embedding is a blocking llama.cpp call; keep it off the event loop.
            vectors = await run_in_threadpool(engine.embed, texts)
            ctx.totals.prompt_tokens = sum(len(engine.tokenize(t)) for t in texts)
        except Exception as e:
            err = e if isinstance(e, APIError) else from_engine(e)
            ctx.finish(err.status)
            raise err from None
        ctx.finish(200)
        return Embeddings(vectors, ctx.totals.prompt_tokens)

    def stream(
        self,
        gen: Generation,
        chunks: AsyncIterator[bytes],
        *,
        tail: Callable[[Generation], bytes],
        error: Callable[[APIError], bytes],
        media_type: str = "text/event-stream",
    ) -> GenerationStream:
        """A streamed response: the door's `chunks`, then `tail(gen)` once the generation is
        accounted (its usage is final), or `error(e)` if it fails after the status line."""
        return GenerationStream(gen, _framed(gen, chunks, tail, error), media_type)


async def _framed(
    gen: Generation,
    chunks: AsyncIterator[bytes],
    tail: Callable[[Generation], bytes],
    error: Callable[[APIError], bytes],
) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
        gen.raise_errors()
    except Exception as e:
        err = e if isinstance(e, APIError) else from_engine(e)
        await gen.close(err.status)
        yield error(err)
        return
    await gen.close(200)
    yield tail(gen)


class GenerationStream(StreamingResponse):
    """A streamed generation that is always closed and accounted for, even when the client
    leaves before the first byte (the body iterator never starts then)."""

    def __init__(self, gen: Generation, body: AsyncIterator[bytes], media_type: str) -> None:
        super().__init__(
            body,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.generation = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.close()


async def _cancel_on_disconnect(gen: Generation, receive: Receive) -> None:
    # After the body is read, the next ASGI message is the disconnect (or nothing at all).
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gen.client_gone = True
            gen.cancel()
            return


async def with_heartbeat(
    events: AsyncIterator[tuple[Choice, Event]], every_s: float
) -> AsyncIterator[tuple[Choice, Event] | None]:
    """`events`, with a None whenever nothing came for `every_s` seconds (e.g. while a long
    prompt prefills), so a door can keep a quiet connection alive."""
    it = aiter(events)
    pending: asyncio.Task[tuple[Choice, Event]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()


def generation_service(request: Request) -> GenerationService:
    return request.app.state.generation
