"""The app factory: `create_app(settings, pool)` wires stores, routes, errors and middleware.

The app's lifespan starts loading the models (the server answers 503 for a model until it is
loaded) and, on shutdown, flushes the ledger and audit log and unloads the models.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from freehold.cluster.upstream import attach_upstreams
from freehold.engine import ModelPool
from freehold.server import anthropic, batches, docs, ollama, openai, ops, responses
from freehold.server.access import authenticate
from freehold.server.audit import AuditLog
from freehold.server.auth import KeyStore, RateLimiter
from freehold.server.bodies import StrictJSONBodies
from freehold.server.door import Door
from freehold.server.errors import ErrorHandlers
from freehold.server.generation import GenerationService
from freehold.server.ledger import Ledger
from freehold.server.metrics import Metrics
from freehold.server.middleware import RequestIdAndLimits
from freehold.server.registry import ModelRegistry
from freehold.server.services import Services
from freehold.server.settings import ServerSettings

DOORS: tuple[Door, ...] = (
    openai.DOOR,
    responses.DOOR,
    batches.DOOR,
    anthropic.DOOR,
    ollama.DOOR,
)

_NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
    "auto_configure": False,
}


def build_services(settings: ServerSettings, pool: ModelPool) -> Services:
    home = settings.home
    home.root.mkdir(parents=True, exist_ok=True)
    registry_ref: list[ModelRegistry] = []
    cache = pool.prompt_cache
    metrics = Metrics(
        lambda: registry_ref[0].stats() if registry_ref else [],
        lambda: cache.stats() if cache is not None else None,
    )
    registry = ModelRegistry(
        pool, list(settings.models), settings.max_queue, metrics, settings.aliases
    )
    registry_ref.append(registry)
    return Services(
        settings=settings,
        registry=registry,
        keys=KeyStore(home.keys),
        limiter=RateLimiter(),
        ledger=Ledger(home.ledger),
        audit=AuditLog(home.audit_log, log_content=settings.log_content),
        metrics=metrics,
    )


def create_app(settings: ServerSettings, pool: ModelPool, *, close_pool: bool = True) -> FastAPI:
    """An ASGI app serving `settings.models` from `pool` (which resolves and loads them)."""
    services = build_services(settings, pool)
    upstreams = attach_upstreams(settings.upstreams, services.registry, services.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.registry.start_loading(settings.eager)
        if upstreams is not None:
            upstreams.start()
        try:
            yield
        finally:
            services.draining = True
            if upstreams is not None:
                upstreams.close()
            services.registry.close()
            services.ledger.close()
            services.audit.close()
            services.keys.close()
            if close_pool:
                pool.close()

    # FastAPI's own /docs, /redoc and /openapi.json are off: its docs pages pull scripts from a
    # CDN, and nothing here should make a browser or the server reach beyond this machine, and
    # its routes would skip the key check. `docs.router` serves both, behind keys, with Swagger
    # UI shipped in the package. FastAPI's OpenTelemetry hooks are off too: an environment
    # variable alone could otherwise start an OTLP exporter.
    app = FastAPI(
        title="Freehold",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry=_NO_TELEMETRY,
    )
    app.state.services = services
    app.state.upstreams = upstreams  # None without --upstream
    app.state.generation = GenerationService(services)
    shapes = {
        prefix: door.render_error
        for door in DOORS
        if door.render_error is not None
        for prefix in door.error_prefixes
    }
    handlers = ErrorHandlers(shapes, authenticate)
    handlers.install(app)
    for door in DOORS:
        for router in door.routers:
            app.include_router(router)
    app.include_router(ops.router)
    app.include_router(docs.router)
    # Inside the size limit (added last, so outermost): a body is counted before it is checked.
    app.add_middleware(StrictJSONBodies, render_error=handlers.render_path)
    app.add_middleware(
        RequestIdAndLimits,
        max_body_bytes=settings.max_body_bytes,
        render_error=handlers.render_path,
    )
    return app
