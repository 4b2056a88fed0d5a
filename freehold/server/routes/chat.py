"""POST /v1/chat/completions: messages through the model's own chat template."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from freehold.engine import Delta, Engine, Finished, TokenLogprob, parse_tool_calls
from freehold.server.auth import ApiKey
from freehold.server.protocol import ChatCompletionRequest, ToolChoiceFunction
from freehold.server.routes.deps import admit, authenticate
from freehold.server.serving import Choice, Generation, SSEResponse, json_response, sampling_params
from freehold.server.sse import ChunkWriter

router = APIRouter()


def _constraint(req: ChatCompletionRequest) -> dict[str, Any]:
    """Grammar-constrained output for response_format and forced tool calls."""
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        return {"json_mode": True}
    if rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
        schema = rf.json_schema.schema_
        return {"json_schema": schema} if schema else {"json_mode": True}
    forced = _forced_tools(req)
    if forced:
        # A call is {"name": ..., "arguments": {...}}; the model may only write one of these.
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
            for t in forced
        ]
        return {"json_schema": options[0] if len(options) == 1 else {"anyOf": options}}
    return {}


def _forced_tools(req: ChatCompletionRequest) -> list[Any]:
    tools = req.tools or []
    if req.tool_choice == "required":
        return list(tools)
    if isinstance(req.tool_choice, ToolChoiceFunction):
        return [t for t in tools if t.function.name == req.tool_choice.function.name]
    return []


def _tools_active(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def _logprobs_json(lps: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.text,
                "logprob": lp.logprob,
                "bytes": list(lp.text.encode()),
                "top_logprobs": [
                    {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
                    for t in lp.top
                ],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def _tool_call_dicts(text: str, parallel: bool | None) -> tuple[str, list[dict[str, Any]]]:
    content, calls = parse_tool_calls(text)
    if parallel is False:
        calls = calls[:1]
    return content, [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def _submit(engine: Engine, req: ChatCompletionRequest, messages: list[dict[str, Any]]):  # noqa: ANN202
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if _tools_active(req) else None
    constraint = _constraint(req)
    top = req.top_logprobs or 0

    def make(i: int) -> tuple[int, Any]:
        params = sampling_params(req, i, logprobs=req.logprobs, top_logprobs=top, **constraint)
        return 0, engine.chat(messages, params, tools=tools)

    return make


@router.post("/v1/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest, request: Request, key: ApiKey | None = Depends(authenticate)
) -> Response:
    messages = [m.for_template() for m in req.messages]
    engine, ctx = admit(
        request,
        key,
        endpoint="chat",
        model=req.model,
        choices=req.n,
        user=req.user,
        prompt=messages,
    )
    gen = Generation.submit(ctx, req.n, _submit(engine, req, messages))
    response_id = f"chatcmpl-{secrets.token_hex(12)}"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writer = ChunkWriter(
            "chat", response_id, ctx.created, req.model, include_usage=include_usage
        )
        return SSEResponse(gen, writer, _chunks(gen, req, writer))
    return await json_response(gen, request, lambda: _response(gen, req, response_id))


def _response(gen: Generation, req: ChatCompletionRequest, response_id: str) -> dict[str, Any]:
    choices = []
    for c in gen.choices:
        assert c.finished is not None
        reason = c.finished.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": c.output, "refusal": None}
        if _tools_active(req):
            content, calls = _tool_call_dicts(c.output, req.parallel_tool_calls)
            if calls:
                message["content"] = content or None
                message["tool_calls"] = calls
                reason = "tool_calls"
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": _logprobs_json(c.logprobs) if req.logprobs else None,
                "finish_reason": reason,
            }
        )
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": gen.ctx.created,
        "model": req.model,
        "system_fingerprint": None,
        "choices": choices,
    }


async def _chunks(
    gen: Generation, req: ChatCompletionRequest, w: ChunkWriter
) -> AsyncIterator[bytes]:
    # With tools, a reply is only known to be a call once it is complete, so it is held back
    # and sent as one delta (content or tool_calls) at the end.
    hold = _tools_active(req)
    for c in gen.choices:
        yield w.role(c.index)
    async for c, ev in gen.events():
        if isinstance(ev, Delta):
            if hold:
                continue
            if ev.text or (req.logprobs and ev.logprobs):
                lp = _logprobs_json(list(ev.logprobs)) if req.logprobs else None
                yield w.text(c.index, ev.text, lp)
        else:
            last = _last_chunks(w, c, ev, req, hold)
            if last:
                yield last


def _last_chunks(
    w: ChunkWriter, c: Choice, ev: Finished, req: ChatCompletionRequest, hold: bool
) -> bytes:
    """The last chunk(s) of one choice: held-back text or tool calls, then the finish reason."""
    if ev.finish_reason in ("error", "cancelled"):
        return b""
    reason = ev.finish_reason
    out = b""
    if hold:
        content, calls = _tool_call_dicts(c.output, req.parallel_tool_calls)
        if calls:
            out += w.tool_calls(c.index, calls)
            reason = "tool_calls"
        elif content:
            out += w.text(c.index, content)
    return out + w.finish(c.index, reason)
