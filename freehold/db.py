"""SQLite files Freehold keeps (catalog, keys, ledger, stored responses): one way to open them
and one migration runner.

Each store lists its schema changes as SQL scripts in order; `PRAGMA user_version` records how
many have run, and each runs in its own transaction, so a crash leaves a file at a known version.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def migrate(db: sqlite3.Connection, migrations: list[str]) -> None:
    """Run the scripts past the file's `user_version`, each atomically with its version bump."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for n, script in enumerate(migrations[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {n}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def open_db(
    path: Path, migrations: list[str], *, private: bool = False, busy_timeout_s: float = 5.0
) -> sqlite3.Connection:
    """A WAL-mode connection (autocommit; any thread, callers serialise) at the latest schema.

    private: owner-only permissions, set before SQLite writes anything into the file.
    busy_timeout_s: how long a statement waits for another connection's write lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
    db = sqlite3.connect(
        path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
    )
    db.execute("PRAGMA journal_mode=WAL")
    migrate(db, migrations)
    return db
