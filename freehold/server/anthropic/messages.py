"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the shared
generation service (what the anthropic SDK and Claude Code speak).

Claude Code posts to `/v1/messages?beta=true`; the query string changes nothing here, nor do
the `anthropic-version` and `anthropic-beta` headers.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from freehold.engine import Delta, Finished, ReplySplitter, split_reply
from freehold.server.access import authenticate
from freehold.server.anthropic.protocol import (
    CountTokensRequest,
    Message,
    MessagesRequest,
    StopReason,
    TextOut,
    TokenCount,
    ToolUseOut,
    Usage,
)
from freehold.server.anthropic.stream import PING, MessageEvents
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError, from_engine
from freehold.server.generation import (
    Generation,
    GenerationRequest,
    GenerationService,
    Job,
    generation_service,
    with_heartbeat,
)

router = APIRouter()

PING_EVERY_S = 5.0  # a ping after this long without an event (a long prompt prefilling)


def generation_request(req: MessagesRequest) -> GenerationRequest:
    messages = req.template_messages()
    job = Job(req.to_sampling_params(), messages=messages, tools=req.template_tools())
    return GenerationRequest("messages", req.model, [job], user=req.user, audit_prompt=messages)


@router.post("/v1/messages")
async def create_message(
    req: MessagesRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    gen = await service.start(request, key, generation_request(req))
    message_id = f"msg_{secrets.token_hex(12)}"
    headers = _headers(request, req)
    if req.stream:
        events = MessageEvents(message_id, req.model)
        chunks = _events(gen, req, events)
        stream = service.stream(gen, chunks, tail=events.tail, error=events.error)
        stream.headers.update(headers)
        return stream
    await service.collect(gen)
    return JSONResponse(_message(gen, req, message_id).model_dump(mode="json"), headers=headers)


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    req: CountTokensRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    """Exactly the tokens /v1/messages would prefill: same template, system and tools. Admitted
    and audited like any request (it counts toward the key's rpm, not its tpm)."""
    messages = req.template_messages()
    engine, ctx = await service.admit(
        request, key, endpoint="count_tokens", model=req.model, places=0, audit_prompt=messages
    )
    try:
        # Rendering and tokenizing a long prompt (Claude Code's is ~22k tokens) takes a while.
        tokens = await run_in_threadpool(engine.chat_tokens, messages, tools=req.template_tools())
    except Exception as e:
        err = e if isinstance(e, APIError) else from_engine(e)
        ctx.finish(err.status)
        raise err from None
    ctx.finish(200)
    count = TokenCount(input_tokens=len(tokens))
    return JSONResponse(count.model_dump(), headers=_headers(request, req))


def _headers(request: Request, req: CountTokensRequest | MessagesRequest) -> dict[str, str]:
    """Anthropic's `request-id`, and what of the request had no effect (header-safe names)."""
    headers = {"request-id": request.state.request_id}
    if ignored := req.ignored_fields():
        headers["x-freehold-ignored-fields"] = ",".join(ignored)
    if left_out := req.left_out_tools:
        headers["x-freehold-left-out-tools"] = ",".join(left_out)
    return headers


def stop_reason(
    fin: Finished, uses: list[ToolUseOut], req: MessagesRequest
) -> tuple[StopReason, str | None]:
    if fin.finish_reason == "length":
        # The engine caps max_tokens at the room left in the context: say which limit it was.
        if fin.usage.completion_tokens < req.max_tokens:
            return "model_context_window_exceeded", None
        return "max_tokens", None
    if uses:
        return "tool_use", None
    if fin.stop_string is not None:
        return "stop_sequence", fin.stop_string
    return "end_turn", None


def _message(gen: Generation, req: MessagesRequest, message_id: str) -> Message:
    c = gen.choices[0]
    assert c.finished is not None
    text, calls = split_reply(c.output, req.tool_names, parallel=req.parallel_tool_use)
    uses = [ToolUseOut.of(call) for call in calls]
    reason, sequence = stop_reason(c.finished, uses, req)
    content: list[TextOut | ToolUseOut] = [TextOut(text=text)] if text else []
    return Message(
        id=message_id,
        model=req.model,
        content=[*content, *uses],
        stop_reason=reason,
        stop_sequence=sequence,
        usage=Usage.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens),
    )


async def _events(
    gen: Generation, req: MessagesRequest, events: MessageEvents
) -> AsyncIterator[bytes]:
    yield events.start(gen.choices[0].handle.prompt_tokens)
    split = ReplySplitter(req.tool_names, parallel=req.parallel_tool_use)
    source = gen.events()
    # Pings while the prompt prefills; once tokens flow, events come every decode step, and the
    # heartbeat's timer per event would cost more than the step's own work on a small CPU.
    beat = with_heartbeat(source, PING_EVERY_S)
    async for item in beat:
        if item is None:
            yield PING
            continue
        out = _on_event(item[1], events, split, req)
        if out:
            yield out
        if isinstance(item[1], Delta) and item[1].tokens:
            break
    await beat.aclose()  # leaves `source` where it was
    async for _, ev in source:
        out = _on_event(ev, events, split, req)
        if out:
            yield out


def _on_event(
    ev: Delta | Finished, events: MessageEvents, split: ReplySplitter, req: MessagesRequest
) -> bytes:
    if isinstance(ev, Delta):
        shown = split.feed(ev.text) if ev.text else ""
        return events.text(shown) if shown else b""
    if ev.finish_reason in ("error", "cancelled"):  # those end in an error event
        return b""
    return _last_blocks(events, split, ev, req)


def _last_blocks(
    events: MessageEvents, split: ReplySplitter, fin: Finished, req: MessagesRequest
) -> bytes:
    """Text held back to the end, the tool uses, and the last block's stop."""
    rest, calls = split.finish()
    uses = [ToolUseOut.of(call) for call in calls]
    out = events.text(rest) if rest else b""
    for use in uses:
        out += events.tool_use(use)
    return out + events.end(*stop_reason(fin, uses, req))
