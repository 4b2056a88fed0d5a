"""The objects one server shares between requests, and each request's accounting.

A `RequestContext` follows one API request from admission to its last byte and, when it ends,
reports it once to the ledger, the audit log, the metrics and the key's token window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from freehold.server.audit import AuditLog
from freehold.server.auth import ApiKey, KeyStore, RateLimiter
from freehold.server.ledger import Ledger, UsageRecord, now_iso
from freehold.server.metrics import Metrics
from freehold.server.registry import ModelRegistry
from freehold.server.settings import ServerSettings

CLIENT_CLOSED = 499  # nginx's code for "the client went away first"


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


@dataclass
class Totals:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class RequestContext:
    services: Services
    request_id: str
    endpoint: str
    model: str
    key: ApiKey | None
    client: str | None
    user: str | None
    prompt_sha256: str
    prompt: Any = None  # kept only with --log-content
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_at: float | None = None
    totals: Totals = field(default_factory=Totals)
    _done: bool = False

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def finish(self, status: int, completion_text: str | None = None) -> None:
        """Account for the request exactly once, whatever path it ended on."""
        if self._done:
            return
        self._done = True
        s = self.services
        t = self.totals
        duration = time.perf_counter() - self.started
        ttft = self.ttft_s
        # Only served model names become labels: clients must not mint new time series.
        label = self.model if s.registry.known(self.model) else "unknown"
        s.metrics.requests.labels(label, self.endpoint, str(status)).inc()
        s.metrics.duration.labels(label).observe(duration)
        if self.key is not None:
            s.limiter.charge(self.key, t.prompt_tokens + t.completion_tokens)
        key_name = self.key.name if self.key else None
        s.ledger.record(
            UsageRecord(
                request_id=self.request_id,
                ts=now_iso(),
                key_name=key_name,
                model=self.model,
                endpoint=self.endpoint,
                prompt_tokens=t.prompt_tokens,
                cached_tokens=t.cached_tokens,
                completion_tokens=t.completion_tokens,
                ttft_ms=None if ttft is None else ttft * 1000,
                duration_ms=duration * 1000,
                status=status,
                user=self.user,
            )
        )
        entry: dict[str, Any] = {
            "request_id": self.request_id,
            "time": now_iso(),
            "key": key_name,
            "client": self.client,
            "endpoint": self.endpoint,
            "model": self.model,
            "user": self.user,
            "status": status,
            "prompt_tokens": t.prompt_tokens,
            "cached_tokens": t.cached_tokens,
            "completion_tokens": t.completion_tokens,
            "duration_ms": round(duration * 1000, 1),
            "prompt_sha256": self.prompt_sha256,
        }
        if s.audit.log_content:
            entry["prompt"] = self.prompt
            entry["completion"] = completion_text
        s.audit.write(entry)


def services(request: Request) -> Services:
    return request.app.state.services


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None
