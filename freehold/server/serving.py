"""Generation requests end to end, shared by /v1/chat/completions and /v1/completions.

A `Generation` owns the engine requests behind one HTTP request (one per choice): it merges
their events, cancels them when the client leaves, and on close settles the usage and reports
the request once. Routes decide what to submit; `sse.py` and `responses.py` decide the shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from freehold.engine import (
    Delta,
    Event,
    Finished,
    RequestHandle,
    SamplingParams,
    TokenLogprob,
    logit_bias_from_strings,
)
from freehold.server.errors import APIError, from_engine, sse_error
from freehold.server.protocol import ChatCompletionRequest, CompletionRequest
from freehold.server.services import CLIENT_CLOSED, RequestContext
from freehold.server.sse import DONE, ChunkWriter

log = logging.getLogger(__name__)

_SEED_MOD = 2**32 - 1
SETTLE_TIMEOUT_S = 5.0


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    index: int,
    *,
    logprobs: bool = False,
    top_logprobs: int = 0,
    json_mode: bool = False,
    json_schema: dict[str, Any] | None = None,
) -> SamplingParams:
    """Engine parameters for choice `index`; unset fields keep the engine's (llama.cpp's)
    defaults. With a seed, choice i uses seed + i, so n > 1 choices differ reproducibly."""
    d = SamplingParams()
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        max_tokens=req.token_limit,
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        top_k=d.top_k if req.top_k is None else req.top_k,
        min_p=d.min_p if req.min_p is None else req.min_p,
        repeat_penalty=d.repeat_penalty if req.repeat_penalty is None else req.repeat_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias_from_strings(req.logit_bias),
        seed=None if req.seed is None else (req.seed + index) % _SEED_MOD,
        stop=stop,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        ignore_eos=req.ignore_eos,
        json_mode=json_mode,
        json_schema=json_schema,
    )


@dataclass
class Choice:
    index: int
    group: int  # which prompt it answers (completions may send several prompts)
    handle: RequestHandle
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0
    finished: Finished | None = None

    @property
    def output(self) -> str:
        return "".join(self.text)


class Generation:
    def __init__(self, ctx: RequestContext, choices: list[Choice], reserved: int) -> None:
        self.ctx = ctx
        self.choices = choices
        self.reserved = reserved  # places taken in the model's admission count
        self.status = CLIENT_CLOSED  # until the request completes one way or another
        self.client_gone = False
        self._closed = False

    @classmethod
    def submit(
        cls,
        ctx: RequestContext,
        count: int,
        make: Callable[[int], tuple[int, RequestHandle]],
    ) -> Generation:
        """Submit `count` engine requests (`make(i)` -> (group, handle)); all or none."""
        choices: list[Choice] = []
        try:
            for i in range(count):
                group, handle = make(i)
                choices.append(Choice(i, group, handle))
        except Exception as e:
            for c in choices:
                c.handle.cancel()
            err = e if isinstance(e, APIError) else from_engine(e)
            cls(ctx, choices, count)._finish_now(err.status)
            raise err from None
        return cls(ctx, choices, count)

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

    async def collect(self, request: Request) -> None:
        """Run every choice to the end; cancel them all if the client disconnects meanwhile."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self._client_left))
        try:
            async for _ in self.events():
                pass
        finally:
            watcher.cancel()
        self.raise_errors()

    def _client_left(self) -> None:
        self.client_gone = True
        self.cancel()

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
        self._finish_now(self.status)

    async def _settle(self, pending: list[Choice]) -> None:
        for c in pending:
            async for ev in c.handle:
                self._note(c, ev)

    def _finish_now(self, status: int) -> None:
        if self._closed:
            return
        self._closed = True
        t = self.ctx.totals
        seen_groups: set[int] = set()
        for c in self.choices:
            f = c.finished
            completion = f.usage.completion_tokens if f else c.tokens
            t.completion_tokens += completion
            if f is not None and c.group not in seen_groups:
                # Like OpenAI, a prompt counts once however many choices answer it.
                seen_groups.add(c.group)
                t.prompt_tokens += f.usage.prompt_tokens
                t.cached_tokens += f.usage.cached_tokens
            if f is not None:
                decode_s = max(f.timings.total_s - f.timings.ttft_s, 0.0)
                ttft = f.timings.ttft_s if f.usage.completion_tokens else None
                metrics = self.ctx.services.metrics
                metrics.observe_generation(self.ctx.model, f.usage, ttft, decode_s)
        s = self.ctx.services
        s.registry.release(self.ctx.model, self.reserved)
        text = "".join(c.output for c in self.choices) if s.audit.log_content else None
        self.ctx.finish(status, text)

    def usage(self) -> dict[str, Any]:
        t = self.ctx.totals
        return usage_dict(t.prompt_tokens, t.completion_tokens, t.cached_tokens)


def usage_dict(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def _cancel_on_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    # After the body is read, the next ASGI message is the disconnect (or nothing at all).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel()
            return


async def json_response(
    gen: Generation, request: Request, body: Callable[[], dict[str, Any]]
) -> JSONResponse:
    """Wait for every choice, then answer `body()` with the usage added; errors become HTTP."""
    try:
        await gen.collect(request)
        out = body()
        gen.status = 200
    except Exception as e:
        err = e if isinstance(e, APIError) else from_engine(e)
        await gen.close(err.status)
        raise err from None
    await gen.close()
    out["usage"] = gen.usage()
    return JSONResponse(out)


class SSEResponse(StreamingResponse):
    """A text/event-stream response: an endpoint's chunks, then the usage chunk and [DONE].

    An error mid-stream becomes an SSE error event (the status line is long gone). The
    generation is always closed and accounted for, even when the client leaves before the first
    byte (the body iterator never starts then).
    """

    def __init__(
        self, generation: Generation, writer: ChunkWriter, chunks: AsyncIterator[bytes]
    ) -> None:
        super().__init__(
            _with_tail(generation, writer, chunks),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.close()


async def _with_tail(
    gen: Generation, w: ChunkWriter, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
        gen.raise_errors()
        if w.include_usage:
            await gen.close(200)
            yield w.usage(gen.usage())
        gen.status = 200
        yield DONE
    except APIError as e:
        gen.status = e.status
        yield sse_error(e)
        yield DONE
