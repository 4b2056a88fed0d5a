"""POST /v1/completions: raw text (or token ids) in, continuation out; base models welcome."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from freehold.engine import Delta, TokenLogprob
from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.generation import (
    Generation,
    GenerationRequest,
    GenerationService,
    Job,
    generation_service,
)
from freehold.server.openai.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from freehold.server.openai.sse import ChunkWriter

router = APIRouter()

MAX_CHOICES = 64


def generation_request(req: CompletionRequest) -> GenerationRequest:
    prompts = req.prompts()
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices per request (prompts × n)", param="n")
    jobs = [
        Job(req.to_sampling_params(j), prompt=p, group=g)
        for g, p in enumerate(prompts)
        for j in range(req.n)
    ]
    return GenerationRequest("completions", req.model, jobs, user=req.user, audit_prompt=req.prompt)


def logprobs_out(lps: list[TokenLogprob], offset: int, k: int) -> CompletionLogprobs:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.text)
    return CompletionLogprobs(
        tokens=[lp.text for lp in lps],
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{t.text: t.logprob for t in lp.top} for lp in lps] if k else None,
        text_offset=offsets,
    )


@router.post("/v1/completions")
async def completions(
    req: CompletionRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    gen = await service.start(request, key, generation_request(req))
    response_id = f"cmpl-{secrets.token_hex(12)}"
    echoes = [_echo_text(gen, c.job.prompt) if req.echo else "" for c in gen.choices]
    if req.stream:
        w = ChunkWriter(
            "text", response_id, gen.ctx.created, req.model, include_usage=req.include_usage
        )
        return service.stream(gen, _chunks(gen, req, w, echoes), tail=w.tail, error=w.error)
    await service.collect(gen)
    return JSONResponse(_response(gen, req, response_id, echoes).model_dump(mode="json"))


def response_body(gen: Generation, req: CompletionRequest) -> dict[str, object]:
    """The JSON this endpoint answers for a collected `gen` (the Batch API's lines reuse it)."""
    echoes = [_echo_text(gen, c.job.prompt) if req.echo else "" for c in gen.choices]
    return _response(gen, req, f"cmpl-{secrets.token_hex(12)}", echoes).model_dump(mode="json")


def _echo_text(gen: Generation, prompt: str | list[int] | None) -> str:
    return prompt if isinstance(prompt, str) else gen.engine.detokenize(list(prompt or []))


def _response(
    gen: Generation, req: CompletionRequest, response_id: str, echoes: list[str]
) -> Completion:
    choices = []
    for c in gen.choices:
        assert c.finished is not None
        echo = echoes[c.index]
        lp = None
        if req.logprobs is not None:
            lp = logprobs_out(c.logprobs, len(echo), req.logprobs)
        choices.append(
            CompletionChoice(
                index=c.index,
                text=echo + c.output,
                logprobs=lp,
                finish_reason=c.finished.finish_reason,
            )
        )
    return Completion(
        id=response_id,
        created=gen.ctx.created,
        model=req.model,
        choices=choices,
        usage=Usage.of_generation(gen),
    )


async def _chunks(
    gen: Generation, req: CompletionRequest, w: ChunkWriter, echoes: list[str]
) -> AsyncIterator[bytes]:
    offsets = [len(e) for e in echoes]
    for c in gen.choices:
        if echoes[c.index]:
            yield w.text(c.index, echoes[c.index])
    async for c, ev in gen.events():
        if isinstance(ev, Delta):
            if ev.text or (req.logprobs is not None and ev.logprobs):
                lp = None
                if req.logprobs is not None:
                    lp = logprobs_out(list(ev.logprobs), offsets[c.index], req.logprobs)
                offsets[c.index] += len(ev.text)
                yield w.text(c.index, ev.text, lp.model_dump() if lp else None)
        elif ev.finish_reason not in ("error", "cancelled"):
            yield w.finish(c.index, ev.finish_reason)
