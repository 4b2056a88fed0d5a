"""POST /v1/chat/completions: messages through the model's own chat template."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from freehold.engine import (
    Delta,
    Finished,
    ReplySplitter,
    TokenLogprob,
    ToolCall,
    split_reply,
)
from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.generation import (
    Choice,
    Generation,
    GenerationRequest,
    GenerationService,
    Job,
    generation_service,
)
from freehold.server.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    FunctionCall,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprobOut,
    Usage,
)
from freehold.server.openai.sse import ChunkWriter

router = APIRouter()


def generation_request(req: ChatCompletionRequest) -> GenerationRequest:
    messages = req.template_messages()
    tools = req.template_tools()
    jobs = [Job(req.to_sampling_params(i), messages=messages, tools=tools) for i in range(req.n)]
    return GenerationRequest("chat", req.model, jobs, user=req.user, audit_prompt=messages)


@router.post("/v1/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    gen = await service.start(request, key, generation_request(req))
    response_id = f"chatcmpl-{secrets.token_hex(12)}"
    if req.stream:
        w = ChunkWriter(
            "chat", response_id, gen.ctx.created, req.model, include_usage=req.include_usage
        )
        return service.stream(gen, _chunks(gen, req, w), tail=w.tail, error=w.error)
    await service.collect(gen)
    return JSONResponse(_response(gen, req, response_id).model_dump(mode="json"))


def response_body(gen: Generation, req: ChatCompletionRequest) -> dict[str, object]:
    """The JSON this endpoint answers for a collected `gen` (the Batch API's lines reuse it)."""
    return _response(gen, req, f"chatcmpl-{secrets.token_hex(12)}").model_dump(mode="json")


def logprobs_out(lps: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=lp.text,
                logprob=lp.logprob,
                bytes=list(lp.text.encode()),
                top_logprobs=[
                    TopLogprobOut(token=t.text, logprob=t.logprob, bytes=list(t.text.encode()))
                    for t in lp.top
                ],
            )
            for lp in lps
        ]
    )


def tool_calls_out(calls: list[ToolCall]) -> list[ToolCallOut]:
    return [
        ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def splitter(req: ChatCompletionRequest) -> ReplySplitter:
    """What of a reply is text and what tool calls, as it streams (see ReplySplitter)."""
    return ReplySplitter(req.tool_names, parallel=_parallel(req))


def _parallel(req: ChatCompletionRequest) -> bool:
    return req.parallel_tool_calls is not False


def _response(gen: Generation, req: ChatCompletionRequest, response_id: str) -> ChatCompletion:
    choices = []
    for c in gen.choices:
        assert c.finished is not None
        reason = c.finished.finish_reason
        text, calls = split_reply(c.output, req.tool_names, parallel=_parallel(req))
        message = AssistantMessage(content=text)
        if calls:
            message = AssistantMessage(content=text or None, tool_calls=tool_calls_out(calls))
            reason = "tool_calls"
        lp = logprobs_out(c.logprobs) if req.logprobs else None
        choices.append(
            ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=reason)
        )
    return ChatCompletion(
        id=response_id,
        created=gen.ctx.created,
        model=req.model,
        choices=choices,
        usage=Usage.of_generation(gen),
    )


async def _chunks(
    gen: Generation, req: ChatCompletionRequest, w: ChunkWriter
) -> AsyncIterator[bytes]:
    # With tools, text is sent as soon as it cannot be part of a call; calls come at the end.
    splits = {c.index: splitter(req) for c in gen.choices}
    pending: dict[int, list[TokenLogprob]] = {c.index: [] for c in gen.choices}
    for c in gen.choices:
        yield w.role(c.index)
    async for c, ev in gen.events():
        split, lps = splits[c.index], pending[c.index]
        if isinstance(ev, Delta):
            shown = split.feed(ev.text) if ev.text else ""
            if req.logprobs:
                lps.extend(ev.logprobs)
            # Logprobs wait with held text; without tools, they go out even with no text.
            if shown or (lps and not split.tools):
                yield w.text(c.index, shown, _logprobs_dump(lps, req))
                lps.clear()
        else:
            last = _last_chunks(w, c, ev, split, lps, req)
            if last:
                yield last


def _logprobs_dump(lps: list[TokenLogprob], req: ChatCompletionRequest) -> dict[str, object] | None:
    return logprobs_out(lps).model_dump() if req.logprobs else None


def _last_chunks(
    w: ChunkWriter,
    c: Choice,
    ev: Finished,
    split: ReplySplitter,
    lps: list[TokenLogprob],
    req: ChatCompletionRequest,
) -> bytes:
    """The last chunk(s) of one choice: held-back text, tool calls, then the finish reason."""
    if ev.finish_reason in ("error", "cancelled"):
        return b""
    reason = ev.finish_reason
    rest, calls = split.finish()
    out = b""
    if rest or (lps and not calls):
        out += w.text(c.index, rest, _logprobs_dump(lps, req))
    if calls:
        out += w.tool_calls(c.index, [call.model_dump() for call in tool_calls_out(calls)])
        reason = "tool_calls"
    return out + w.finish(c.index, reason)
