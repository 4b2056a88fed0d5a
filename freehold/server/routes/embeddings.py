"""POST /v1/embeddings: pooled, L2-normalised vectors from the served model."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from freehold.server.auth import ApiKey
from freehold.server.errors import APIError, from_engine
from freehold.server.protocol import EmbeddingRequest
from freehold.server.routes.deps import admit, authenticate

router = APIRouter()


def _encode(vec: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # what the openai SDK asks for by default: little-endian float32
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
    return vec


@router.post("/v1/embeddings")
async def embeddings(
    req: EmbeddingRequest, request: Request, key: ApiKey | None = Depends(authenticate)
) -> Response:
    texts = req.texts()
    engine, ctx = admit(
        request,
        key,
        endpoint="embeddings",
        model=req.model,
        choices=0,
        user=req.user,
        prompt=req.input,
    )
    try:
        width = engine.model.n_embd
        if req.dimensions is not None and req.dimensions != width:
            raise APIError(
                400,
                f"dimensions={req.dimensions} cannot be honoured: {req.model} embeds in {width}",
                param="dimensions",
            )
        # Embedding is a blocking llama.cpp call; keep it off the event loop.
        vectors = await run_in_threadpool(engine.embed, texts)
        ctx.totals.prompt_tokens = sum(len(engine.tokenize(t)) for t in texts)
    except Exception as e:
        err = e if isinstance(e, APIError) else from_engine(e)
        ctx.finish(err.status)
        raise err from None
    ctx.finish(200)
    n = ctx.totals.prompt_tokens
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": req.model,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )
