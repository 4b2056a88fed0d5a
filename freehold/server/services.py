"""The objects one server shares between requests (stores, registry, metrics, settings)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from freehold.server.audit import AuditLog
from freehold.server.auth import KeyStore, RateLimiter
from freehold.server.ledger import Ledger
from freehold.server.metrics import Metrics
from freehold.server.registry import ModelRegistry
from freehold.server.settings import ServerSettings


@dataclass
class Services:
    settings: ServerSettings
    registry: ModelRegistry
    keys: KeyStore
    limiter: RateLimiter
    ledger: Ledger
    audit: AuditLog
    metrics: Metrics
    draining: bool = False


def services(request: Request) -> Services:
    return request.app.state.services


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None
