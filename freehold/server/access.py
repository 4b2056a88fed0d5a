"""Who is calling and what they may use: the key behind a request, and the model checks every
front door shares (draining, served, allowed). Rate limits and capacity are the generation
service's, since they are charged per generation.
"""

from __future__ import annotations

from fastapi import Request

from freehold.engine import Engine
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.ledger import now_iso
from freehold.server.services import Services, client_address, services


def presented_secret(request: Request) -> str | None:
    """The key a client sent: `Authorization: Bearer` (OpenAI, Ollama) or `x-api-key`
    (Anthropic's SDK and Claude Code)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key", "").strip() or None


def authenticate(request: Request) -> ApiKey | None:
    """The caller's key; None when the server has no keys (open, loopback-only by default)."""
    s = services(request)
    if not s.keys.any():
        return None
    secret = presented_secret(request)
    key = s.keys.lookup(secret) if secret else None
    if key is None:
        audit_refusal(request, None, None, 401)
        why = "no API key given" if secret is None else "the API key is not valid"
        raise APIError(
            401,
            f"{why}: send 'Authorization: Bearer <key>' or 'x-api-key: <key>' "
            "(create one with `freehold keys create`)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.key = key
    return key


def audit_refusal(request: Request, key: ApiKey | None, model: str | None, status: int) -> None:
    """Refusals before a model is chosen never reach the ledger, only the audit log."""
    services(request).audit.write(
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


def served_model(s: Services, name: str) -> str:
    """The served model a client's name stands for (its own id or an `--alias`), or 404."""
    return s.registry.resolve(name)


async def checked_engine(s: Services, key: ApiKey | None, model: str) -> Engine:
    """The running engine for a served model id this key may use, or the refusal.

    A model still loading is waited for, up to `--load-wait` seconds: the first request after
    a start simply takes longer (as with Ollama); past that it gets 503 and Retry-After."""
    if s.draining:
        raise APIError(
            503, "the server is shutting down", code="draining", headers={"Retry-After": "5"}
        )
    if key is not None and not key.allows(model):
        raise APIError(
            403,
            f"the key {key.name!r} may not use model {model!r}",
            param="model",
            code="model_not_allowed",
        )
    await s.registry.wait_loaded(model, s.settings.load_wait_s)
    return s.registry.engine(model)
