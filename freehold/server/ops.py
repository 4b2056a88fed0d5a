"""Operations: /health (liveness, always open), /ready (models loaded), /metrics (Prometheus),
/devices (the llama.cpp backend, its devices, and each loaded model's GPU offload)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.services import services

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, key: ApiKey | None = Depends(authenticate)) -> Response:
    s = services(request)
    models = s.registry.ready()
    ok = not s.draining and s.registry.all_ready()
    status = "draining" if s.draining else ("ready" if ok else "loading")
    body: dict[str, object] = {"status": status, "models": models}
    upstreams = getattr(request.app.state, "upstreams", None)
    if upstreams is not None:  # each one's health: a model is ready while one of its group is
        body["upstreams"] = upstreams.describe()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/devices")
async def devices(request: Request, key: ApiKey | None = Depends(authenticate)) -> dict:
    from freehold.engine.devices import detect

    s = services(request)
    backend = detect()
    offload = s.registry.pool.offload()
    models = {
        model: {"state": state, **(offload[model].to_json() if model in offload else {})}
        for model, state in s.registry.ready().items()
    }
    out = {
        "backend": backend.name,
        "gpu_offload": backend.gpu_offload,
        "devices": [asdict(d) for d in backend.devices],
        "models": models,
    }
    upstreams = getattr(request.app.state, "upstreams", None)
    if upstreams is not None:  # their devices are elsewhere: say where, and how they are
        out["upstreams"] = upstreams.describe()
        for model, group in upstreams.groups.items():
            models[model]["summary"] = f"served by upstream {', '.join(u.name for u in group)}"
    return out


@router.get("/metrics")
async def metrics(request: Request, key: ApiKey | None = Depends(authenticate)) -> Response:
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
