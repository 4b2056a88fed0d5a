"""POST /api/embed and the older /api/embeddings: pooled, L2-normalised vectors.

Any model embeds (llama.cpp pools its last hidden states; mean pooling for a model that declares
none), as with Ollama. An empty input only loads the model (or unloads it with keep_alive 0).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.generation import GenerationService, generation_service
from freehold.server.ollama.facts import served_id
from freehold.server.ollama.http import JSONBodyRoute
from freehold.server.ollama.loading import loaded_engine, unload_when_idle, wait_loaded
from freehold.server.ollama.protocol import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    Options,
)

router = APIRouter(route_class=JSONBodyRoute)
ENDPOINT = "ollama.embed"


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


async def _vectors(
    service: GenerationService,
    request: Request,
    key: ApiKey | None,
    *,
    name: str,
    texts: list[str],
    options: Options | None,
    dimensions: int | None = None,
) -> tuple[list[list[float]], int, float]:
    """The vectors of `texts` (none: only load the model), their tokens, seconds of loading."""
    s = service.services
    mid = served_id(s, name)
    waited = await wait_loaded(s, key, mid)
    if not texts:
        _, ctx = await service.admit(request, key, endpoint=ENDPOINT, model=mid, places=0)
        ctx.finish(200)
        return [], 0, waited
    num_ctx = options.num_ctx if options else None
    allowed = s.registry.known(mid) and (key is None or key.allows(mid))
    engine = loaded_engine(s, mid) if allowed else None
    if num_ctx is not None and engine is not None and num_ctx > engine.n_ctx_per_slot:
        raise APIError(
            400,
            f"options.num_ctx={num_ctx} is more than {mid} is loaded with "
            f"({engine.n_ctx_per_slot} tokens); send at most that",
            param="options.num_ctx",
        )

    def check_width(width: int) -> None:
        if dimensions is not None and dimensions != width:
            raise APIError(
                400,
                f"dimensions={dimensions} cannot be honoured: {mid} embeds in {width} "
                "dimensions (Freehold does not shorten vectors)",
                param="dimensions",
            )

    result = await service.embed(
        request, key, endpoint=ENDPOINT, model=mid, texts=texts, check_width=check_width
    )
    return result.vectors, result.prompt_tokens, waited


@router.post("/api/embed")
async def embed(
    req: EmbedRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> JSONResponse:
    started = time.perf_counter()
    texts = [] if req.input == "" else req.texts()
    vectors, tokens, waited = await _vectors(
        service,
        request,
        key,
        name=req.model,
        texts=texts,
        options=req.options,
        dimensions=req.dimensions,
    )
    if req.unload_after:
        await unload_when_idle(service.services, served_id(service.services, req.model))
    body = EmbedResponse(
        model=req.model,
        embeddings=vectors,
        total_duration=_ns(time.perf_counter() - started),
        load_duration=_ns(waited),
        prompt_eval_count=tokens,
    )
    return JSONResponse(body.dump())


@router.post("/api/embeddings")
async def embeddings(
    req: EmbeddingsRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> JSONResponse:
    texts = [req.prompt] if req.prompt else []
    vectors, _, _ = await _vectors(
        service, request, key, name=req.model, texts=texts, options=req.options
    )
    if req.unload_after:
        await unload_when_idle(service.services, served_id(service.services, req.model))
    return JSONResponse(EmbeddingsResponse(embedding=vectors[0] if vectors else []).dump())
