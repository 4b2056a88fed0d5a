"""The usage ledger: one SQLite row per API request, written off the request path.

Handlers `record()` into an in-memory queue; a writer thread drains it in batches into
ledger.db (WAL, so `freehold usage` can read while the server writes). Schema changes migrate
forward with `PRAGMA user_version`, as the vault's catalog does.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freehold.db import open_db
from freehold.errors import InvalidInput
from freehold.server.writer import BatchWriter

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 1: one row per request.
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts TEXT NOT NULL,
        key_name TEXT,
        model TEXT,
        endpoint TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        ttft_ms REAL,
        duration_ms REAL NOT NULL,
        status INTEGER NOT NULL,
        user TEXT
    );
    CREATE INDEX requests_ts ON requests (ts)
    """,
]

_GROUPS = {
    "key": "COALESCE(key_name, '-')",
    "model": "COALESCE(model, '-')",
    "day": "substr(ts, 1, 10)",
}


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    ts: str  # ISO-8601 UTC
    key_name: str | None
    model: str | None
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    duration_ms: float
    status: int  # HTTP status; 499 when the client went away first
    user: str | None = None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def connect(path: Path) -> sqlite3.Connection:
    return open_db(path, MIGRATIONS)


class Ledger(BatchWriter):
    """Append-only writer; `record()` never blocks on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect(path)
        super().__init__("freehold-ledger")

    def record(self, rec: UsageRecord) -> None:
        self._put(rec)

    def _write_batch(self, items: list[Any]) -> None:
        # SQLite stores text as UTF-8: a model name or user as a client sent it must not be able
        # to fail the batch (and with it every row in it).
        self._write([tuple(_storable(v) for v in astuple(r)) for r in items])

    def _close_sink(self) -> None:
        self._db.close()

    def _write(self, rows: list[tuple]) -> None:
        for attempt in range(3):
            try:
                with self._db:
                    self._db.executemany(
                        "INSERT INTO requests (request_id, ts, key_name, model, endpoint, "
                        "prompt_tokens, cached_tokens, completion_tokens, ttft_ms, duration_ms, "
                        "status, user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                return
            except sqlite3.OperationalError as e:  # e.g. a long reader lock; retry briefly
                log.warning("ledger write failed (%s); attempt %d", e, attempt + 1)
                time.sleep(0.2)
        log.error("dropped %d ledger rows after retries", len(rows))


def _storable(value: Any) -> Any:
    """Text with any lone surrogate written as its `\\udXXX` escape; other values as they are."""
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def summarize(path: Path, by: str = "key") -> list[dict[str, Any]]:
    """Totals per key, model or day (UTC), biggest token users first."""
    if by not in _GROUPS:
        raise InvalidInput(f"--by must be one of {', '.join(_GROUPS)}, not {by!r}")
    if not path.exists():
        return []
    db = connect(path)
    try:
        rows = db.execute(
            f"SELECT {_GROUPS[by]} AS g, COUNT(*), "
            "SUM(status < 400), SUM(status >= 400), "
            "SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
            "AVG(ttft_ms), AVG(duration_ms) "
            "FROM requests GROUP BY g ORDER BY SUM(prompt_tokens + completion_tokens) DESC, g"
        ).fetchall()
    finally:
        db.close()
    out = []
    for g, n, ok, failed, p, c, comp, ttft, dur in rows:
        out.append(
            {
                by: g,
                "requests": n,
                "ok": ok or 0,
                "failed": failed or 0,
                "prompt_tokens": p or 0,
                "cached_tokens": c or 0,
                "completion_tokens": comp or 0,
                "total_tokens": (p or 0) + (comp or 0),
                "avg_ttft_ms": round(ttft, 1) if ttft is not None else None,
                "avg_duration_ms": round(dur, 1) if dur is not None else None,
            }
        )
    return out
