"""The Responses API store: responses kept with `store: true` when the server runs with
`--store-responses`, so that `previous_response_id`, GET and DELETE work.

responses.db (SQLite, WAL, mode 0600: it holds prompts and replies) keeps one row per stored
response: who made it (the key's name; "" when the server has no keys), this request's own
input items, the response object as returned, and the response it continued. A conversation
is rebuilt by walking those links back, as OpenAI's API does, so each row holds only its own
turn. Every write is one transaction; the schema migrates forward by `PRAGMA user_version`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from freehold.db import open_db
from freehold.errors import InvalidInput

MIGRATIONS: list[str] = [
    # 1: one row per stored response.
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        previous_id TEXT,
        input TEXT NOT NULL,
        response TEXT NOT NULL
    );
    CREATE INDEX responses_owner ON responses (owner)
    """,
]

MAX_CHAIN = 10_000  # a guard against a damaged file linking responses in a loop


class BrokenChain(InvalidInput):
    """An earlier response of a conversation is gone (deleted), so it cannot be continued."""


class ResponseStore:
    """responses.db: one connection, serialised by a lock (rows are read and written whole)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # Private: prompts and replies are inside (its -wal and -shm files take the same mode).
        self.db = open_db(path, MIGRATIONS, private=True)
        self.db.execute("PRAGMA synchronous=NORMAL")  # atomic still; WAL syncs at checkpoints

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def save(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Keep `response` (as returned to the client) and the input items of its request."""
        row = (
            response["id"],
            owner,
            int(response["created_at"]),
            response.get("previous_response_id"),
            json.dumps(input_items, ensure_ascii=False),
            json.dumps(response, ensure_ascii=False),
        )
        with self._lock, self.db:
            self.db.execute(
                "INSERT INTO responses (id, owner, created_at, previous_id, input, response) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )

    def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The response as it was returned, if `owner` made it."""
        with self._lock:
            row = self.db.execute(
                "SELECT response FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock, self.db:
            cur = self.db.execute(
                "DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
            )
        return cur.rowcount > 0

    def conversation(self, owner: str, response_id: str) -> list[dict[str, Any]] | None:
        """Every input and output item up to and including `response_id`, oldest first; None
        when `owner` has no such response. An earlier link that is gone raises BrokenChain."""
        turns: list[list[dict[str, Any]]] = []
        current: str | None = response_id
        with self._lock:
            while current is not None and len(turns) < MAX_CHAIN:
                row = self.db.execute(
                    "SELECT previous_id, input, response FROM responses WHERE id = ? AND owner = ?",
                    (current, owner),
                ).fetchone()
                if row is None:
                    if current == response_id:
                        return None
                    raise BrokenChain(
                        f"response {current!r}, an earlier turn of {response_id!r}, was deleted; "
                        "the conversation cannot be continued from it"
                    )
                previous, items, response = row
                turns.append(json.loads(items) + json.loads(response).get("output", []))
                current = previous
        return [item for turn in reversed(turns) for item in turn]
