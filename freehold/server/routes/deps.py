"""Request prerequisites shared by the routes: the caller's key, and admission to a model."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from freehold.engine import Engine
from freehold.server.audit import prompt_digest
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.ledger import now_iso
from freehold.server.services import RequestContext, client_address, services


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authenticate(request: Request) -> ApiKey | None:
    """The caller's key; None when the server has no keys (open, loopback-only by default)."""
    s = services(request)
    if not s.keys.any():
        return None
    secret = _bearer(request)
    key = s.keys.lookup(secret) if secret else None
    if key is None:
        _audit_refusal(request, None, None, 401)
        why = "no API key given" if secret is None else "the API key is not valid"
        raise APIError(
            401,
            f"{why}: send 'Authorization: Bearer <key>' (create one with `freehold keys create`)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.key = key
    return key


def _audit_refusal(request: Request, key: ApiKey | None, model: str | None, status: int) -> None:
    """401s never reach a model, so they only go to the audit log."""
    s = services(request)
    s.audit.write(
        {
            "request_id": request.state.request_id,
            "time": now_iso(),
            "key": key.name if key else None,
            "client": client_address(request),
            "endpoint": request.url.path,
            "model": model,
            "status": status,
        }
    )


def _checked_engine(request: Request, key: ApiKey | None, model: str) -> Engine:
    s = services(request)
    if s.draining:
        raise APIError(
            503, "the server is shutting down", code="draining", headers={"Retry-After": "5"}
        )
    if not s.registry.known(model):
        s.registry.engine(model)  # raises the 404
    if key is not None and not key.allows(model):
        raise APIError(
            403,
            f"the key {key.name!r} may not use model {model!r}",
            param="model",
            code="model_not_allowed",
        )
    engine = s.registry.engine(model)
    if key is not None:
        wait = s.limiter.admit(key)
        if wait is not None:
            s.metrics.rejected.labels(model, "rate_limit").inc()
            raise APIError(
                429,
                f"the key {key.name!r} is over its rate limit; retry in {wait:.0f}s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )
    return engine


def admit(
    request: Request,
    key: ApiKey | None,
    *,
    endpoint: str,
    model: str,
    choices: int,
    user: str | None,
    prompt: Any,
) -> tuple[Engine, RequestContext]:
    """Check draining, model, permission and limits; reserve capacity; start accounting.

    The caller must `services.registry.release(model, choices)` when the request ends.
    """
    s = services(request)
    ctx = RequestContext(
        services=s,
        request_id=request.state.request_id,
        endpoint=endpoint,
        model=model,
        key=key,
        client=client_address(request),
        user=user,
        prompt_sha256=prompt_digest(prompt),
        prompt=prompt if s.audit.log_content else None,
    )
    try:
        engine = _checked_engine(request, key, model)
        s.registry.admit(model, engine, choices)
    except APIError as e:
        ctx.finish(e.status)  # refusals are in the ledger and audit log too, with 0 tokens
        raise
    return engine, ctx
