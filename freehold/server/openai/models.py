"""GET /v1/models and /v1/models/{id}: what this server offers (to this key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.openai.protocol import ModelCard, ModelList
from freehold.server.services import services

router = APIRouter()


def _card(request: Request, model_id: str) -> ModelCard:
    return ModelCard(id=model_id, created=services(request).registry.created(model_id))


@router.get("/v1/models")
async def list_models(request: Request, key: ApiKey | None = Depends(authenticate)) -> ModelList:
    ids = [m for m in services(request).registry.ids if key is None or key.allows(m)]
    return ModelList(data=[_card(request, m) for m in ids])


@router.get("/v1/models/{model_id:path}")
async def get_model(
    model_id: str, request: Request, key: ApiKey | None = Depends(authenticate)
) -> ModelCard:
    reg = services(request).registry
    if not reg.known(model_id) or (key is not None and not key.allows(model_id)):
        raise APIError(
            404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"
        )
    return _card(request, model_id)
