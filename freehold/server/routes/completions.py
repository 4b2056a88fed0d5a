"""POST /v1/completions: raw text (or token ids) in, continuation out; base models welcome."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from freehold.engine import Delta, Engine, RequestHandle, TokenLogprob
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.protocol import CompletionRequest
from freehold.server.routes.deps import admit, authenticate
from freehold.server.serving import Generation, SSEResponse, json_response, sampling_params
from freehold.server.sse import ChunkWriter

router = APIRouter()


def _logprobs_json(lps: list[TokenLogprob], offset: int, k: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists per token."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.text)
    return {
        "tokens": [lp.text for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.text: t.logprob for t in lp.top} for lp in lps] if k else None,
        "text_offset": offsets,
    }


def _submit(engine: Engine, req: CompletionRequest, prompts: list[str | list[int]]):  # noqa: ANN202
    want_lp = req.logprobs is not None

    def make(i: int) -> tuple[int, RequestHandle]:
        group, j = divmod(i, req.n)
        params = sampling_params(req, j, logprobs=want_lp, top_logprobs=req.logprobs or 0)
        return group, engine.submit(prompts[group], params)

    return make


def _echo_text(engine: Engine, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.detokenize(prompt)


@router.post("/v1/completions")
async def completions(
    req: CompletionRequest, request: Request, key: ApiKey | None = Depends(authenticate)
) -> Response:
    prompts = req.prompts()
    count = len(prompts) * req.n
    if count > 64:
        raise APIError(400, "at most 64 choices per request (prompts × n)", param="n")
    engine, ctx = admit(
        request,
        key,
        endpoint="completions",
        model=req.model,
        choices=count,
        user=req.user,
        prompt=req.prompt,
    )
    gen = Generation.submit(ctx, count, _submit(engine, req, prompts))
    response_id = f"cmpl-{secrets.token_hex(12)}"
    echoes = [_echo_text(engine, p) if req.echo else "" for p in prompts]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writer = ChunkWriter(
            "text", response_id, ctx.created, req.model, include_usage=include_usage
        )
        return SSEResponse(gen, writer, _chunks(gen, req, writer, echoes))
    return await json_response(gen, request, lambda: _response(gen, req, response_id, echoes))


def _response(
    gen: Generation, req: CompletionRequest, response_id: str, echoes: list[str]
) -> dict[str, Any]:
    choices = []
    for c in gen.choices:
        assert c.finished is not None
        echo = echoes[c.group]
        lp = None
        if req.logprobs is not None:
            lp = _logprobs_json(c.logprobs, len(echo), req.logprobs)
        choices.append(
            {
                "index": c.index,
                "text": echo + c.output,
                "logprobs": lp,
                "finish_reason": c.finished.finish_reason,
            }
        )
    return {
        "id": response_id,
        "object": "text_completion",
        "created": gen.ctx.created,
        "model": req.model,
        "system_fingerprint": None,
        "choices": choices,
    }


async def _chunks(
    gen: Generation, req: CompletionRequest, w: ChunkWriter, echoes: list[str]
) -> AsyncIterator[bytes]:
    offsets = [len(echoes[c.group]) for c in gen.choices]
    for c in gen.choices:
        if echoes[c.group]:
            yield w.text(c.index, echoes[c.group])
    async for c, ev in gen.events():
        if isinstance(ev, Delta):
            if ev.text or (req.logprobs is not None and ev.logprobs):
                lp = None
                if req.logprobs is not None:
                    lp = _logprobs_json(list(ev.logprobs), offsets[c.index], req.logprobs)
                offsets[c.index] += len(ev.text)
                yield w.text(c.index, ev.text, lp)
        elif ev.finish_reason not in ("error", "cancelled"):
            yield w.finish(c.index, ev.finish_reason)
