"""API keys: creation, hashed storage, lookup, and per-key request/token rate limits.

A secret is 32 random bytes (URL-safe base64) behind a `fh-` prefix; only its sha256 is stored,
which is enough for a high-entropy secret (no salt or slow hash is needed when guessing is
hopeless). The server reads the store on each request, so keys made or revoked with the CLI
take effect at once without a restart.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from freehold.db import open_db
from freehold.errors import InvalidInput, NotFound

PREFIX = "fh-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

MIGRATIONS: list[str] = [
    # 1: keys by hash, with the models they may use and their limits.
    """
    CREATE TABLE keys (
        name TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        hint TEXT NOT NULL,
        models TEXT,
        rpm INTEGER,
        tpm INTEGER,
        created_at TEXT NOT NULL
    )
    """,
]


@dataclass(frozen=True)
class ApiKey:
    name: str
    hint: str  # the last 4 characters, to tell keys apart in listings
    models: tuple[str, ...] | None  # None: every model
    rpm: int | None
    tpm: int | None
    created_at: str

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hint": f"{PREFIX}…{self.hint}",
            "models": list(self.models) if self.models is not None else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "created_at": self.created_at,
        }


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """keys.db: one connection, serialised by a lock (lookups are microseconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # Only hashes inside, but who holds keys is nobody else's business.
        self.db = open_db(path, MIGRATIONS, private=True)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- CLI side ------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[ApiKey, str]:
        """Make a key; returns it and its secret, which is shown once and never stored."""
        if not _NAME_RE.match(name):
            raise InvalidInput(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        for what, v in (("--rpm", rpm), ("--tpm", tpm)):
            if v is not None and v < 1:
                raise InvalidInput(f"{what} must be at least 1, got {v}")
        models = [m.strip() for m in models or [] if m.strip()] or None
        secret = PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            try:
                self.db.execute(
                    "INSERT INTO keys (name, hash, hint, models, rpm, tpm, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        hash_secret(secret),
                        secret[-4:],
                        ",".join(models) if models else None,
                        rpm,
                        tpm,
                        created,
                    ),
                )
            except sqlite3.IntegrityError:
                raise InvalidInput(
                    f"a key named {name!r} already exists; revoke it first or pick another name"
                ) from None
        key = ApiKey(name, secret[-4:], tuple(models) if models else None, rpm, tpm, created)
        return key, secret

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self.db.execute(
                "SELECT name, hint, models, rpm, tpm, created_at FROM keys ORDER BY name"
            ).fetchall()
        return [_key(r) for r in rows]

    def revoke(self, name: str) -> None:
        with self._lock:
            cur = self.db.execute("DELETE FROM keys WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise NotFound(f"no key named {name!r}; `freehold keys list` shows them")

    # -- server side ---------------------------------------------------------------------------

    def any(self) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def lookup(self, secret: str) -> ApiKey | None:
        with self._lock:
            row = self.db.execute(
                "SELECT name, hint, models, rpm, tpm, created_at FROM keys WHERE hash = ?",
                (hash_secret(secret),),
            ).fetchone()
        return _key(row) if row else None


def _key(row: tuple) -> ApiKey:
    name, hint, models, rpm, tpm, created = row
    return ApiKey(name, hint, tuple(models.split(",")) if models else None, rpm, tpm, created)


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0


class RateLimiter:
    """Sliding one-minute windows per key: requests at admission, tokens once a request ends.

    Tokens are charged after the fact (a request's length is unknown up front), so a key may
    overshoot its tpm by one request's worth; the next request then waits.
    """

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def admit(self, key: ApiKey, now: float | None = None) -> float | None:
        """None if `key` may send a request now, else seconds to wait (and nothing is counted)."""
        if key.rpm is None and key.tpm is None:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._windows.setdefault(key.name, _Window())
            self._expire(w, now)
            if key.rpm is not None and len(w.requests) >= key.rpm:
                return max(w.requests[0] + self.WINDOW_S - now, 0.001)
            if key.tpm is not None and w.token_sum >= key.tpm:
                return max(w.tokens[0][0] + self.WINDOW_S - now, 0.001)
            w.requests.append(now)
            return None

    def charge(self, key: ApiKey, tokens: int, now: float | None = None) -> None:
        if key.tpm is None or tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._windows.setdefault(key.name, _Window())
            w.tokens.append((now, tokens))
            w.token_sum += tokens

    def _expire(self, w: _Window, now: float) -> None:
        cutoff = now - self.WINDOW_S
        while w.requests and w.requests[0] <= cutoff:
            w.requests.popleft()
        while w.tokens and w.tokens[0][0] <= cutoff:
            w.token_sum -= w.tokens.popleft()[1]
