"""POST /v1/embeddings: pooled, L2-normalised vectors from the served model."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.generation import GenerationService, Origin, generation_service
from freehold.server.openai.protocol import (
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)

router = APIRouter()


def _encode(vec: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # what the openai SDK asks for by default: little-endian float32
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
    return vec


@router.post("/v1/embeddings")
async def embeddings(
    req: EmbeddingRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    return JSONResponse(await response_body(service, request, key, req))


async def response_body(
    service: GenerationService,
    origin: Request | Origin,
    key: ApiKey | None,
    req: EmbeddingRequest,
    endpoint: str = "embeddings",
) -> dict[str, object]:
    """Embed `req` and the JSON this endpoint answers (the Batch API's lines reuse it)."""

    def check_width(width: int) -> None:
        if req.dimensions is not None and req.dimensions != width:
            raise APIError(
                400,
                f"dimensions={req.dimensions} cannot be honoured: {req.model} embeds in {width}",
                param="dimensions",
            )

    result = await service.embed(
        origin,
        key,
        endpoint=endpoint,
        model=req.model,
        texts=req.texts(),
        user=req.user,
        check_width=check_width,
    )
    n = result.prompt_tokens
    return EmbeddingList(
        data=[
            EmbeddingData(index=i, embedding=_encode(v, req.encoding_format))
            for i, v in enumerate(result.vectors)
        ],
        model=req.model,
        usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n),
    ).model_dump(mode="json")
