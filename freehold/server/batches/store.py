"""The Batch API's state: batches.db (SQLite, WAL, mode 0600: prompts and replies are inside)
and one file per uploaded or produced file under the home's `files/` (written atomically).

Rows: `files` (who owns it, its name and purpose), `batches` (status and timestamps), and
`lines`, one per input line with its request body and, once it ran, its result. A line's
result is written in the same transaction that marks it done, so a server that stops mid-batch
resumes with exactly the lines that have no result yet.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freehold.atomic import atomic_write
from freehold.db import open_db
from freehold.server.batches.lines import ParsedLine
from freehold.server.batches.protocol import (
    COMPLETION_WINDOW_S,
    BatchError,
    BatchErrors,
    BatchObject,
    BatchUsage,
    FileObject,
    LineError,
    OutputLine,
    RequestCounts,
)

MIGRATIONS: list[str] = [
    # 1: files, batches and their lines.
    """
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX files_owner ON files (owner, seq);
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        in_progress_at INTEGER,
        finalizing_at INTEGER,
        completed_at INTEGER,
        failed_at INTEGER,
        expired_at INTEGER,
        cancelling_at INTEGER,
        cancelled_at INTEGER,
        output_file_id TEXT,
        error_file_id TEXT,
        errors TEXT,
        metadata TEXT
    );
    CREATE INDEX batches_owner ON batches (owner, seq);
    CREATE INDEX batches_status ON batches (status);
    CREATE TABLE lines (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        custom_id TEXT,
        body TEXT,
        status INTEGER,
        result TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (batch_id, line)
    ) WITHOUT ROWID
    """,
]

ACTIVE = ("validating", "in_progress", "cancelling", "finalizing")
_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_STAMP = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}
_FILE_COLS = "id, filename, purpose, bytes, created_at"
_BATCH_COLS = (
    "id, owner, endpoint, model, input_file_id, completion_window, status, created_at, "
    "expires_at, " + ", ".join(_TIMES) + ", output_file_id, error_file_id, errors, metadata"
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class Batch:
    """A batch's row, as the runner needs it."""

    id: str
    owner: str
    endpoint: str
    status: str
    expires_at: int


@dataclass
class PendingLine:
    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass
class LineResult:
    status: int  # the endpoint's HTTP status; 200 goes to the output file, others to errors
    output: OutputLine
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class BatchStore:
    """batches.db and the files' contents: one connection, serialised by a lock."""

    def __init__(self, db_path: Path, files_dir: Path) -> None:
        self.files_dir = files_dir
        self._lock = threading.Lock()
        self.db = open_db(db_path, MIGRATIONS, private=True)
        self.db.execute("PRAGMA synchronous=NORMAL")  # atomic still; WAL syncs at checkpoints

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- files ---------------------------------------------------------------------------------

    def add_file(self, owner: str, filename: str, purpose: str, data: bytes) -> FileObject:
        """Keep `data` as a new file: its content first (atomically), then its row."""
        file = FileObject(
            id=new_id("file"),
            bytes=len(data),
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
        )
        self.files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_write(self.content_path(file.id)) as f:
            f.write(data)
        with self._lock, self.db:
            self.db.execute(
                "INSERT INTO files (id, owner, filename, purpose, bytes, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (file.id, owner, filename, purpose, file.bytes, file.created_at),
            )
        return file

    def content_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def get_file(self, owner: str, file_id: str) -> FileObject | None:
        with self._lock:
            row = self.db.execute(
                f"SELECT {_FILE_COLS} FROM files WHERE id = ? AND owner = ?", (file_id, owner)
            ).fetchone()
        return _file(row) if row else None

    def list_files(
        self, owner: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[FileObject], bool]:
        """One page of `owner`'s files, and whether more follow."""
        where, args = ["owner = ?"], [owner]
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            cmp = "<" if newest_first else ">"
            where.append(f"seq {cmp} (SELECT seq FROM files WHERE id = ? AND owner = ?)")
            args += [after, owner]
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            rows = self.db.execute(
                f"SELECT {_FILE_COLS} FROM files WHERE {' AND '.join(where)} "
                f"ORDER BY seq {order} LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
        return [_file(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self._lock, self.db:
            cur = self.db.execute("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner))
        if cur.rowcount:
            self.content_path(file_id).unlink(missing_ok=True)
        return bool(cur.rowcount)

    # -- batches -------------------------------------------------------------------------------

    def create_batch(
        self,
        owner: str,
        endpoint: str,
        input_file_id: str,
        metadata: dict[str, str] | None,
        lines: list[ParsedLine],
    ) -> str:
        """A new batch with its lines; refused lines get their error result at once. A batch
        with no line that can run is failed from the start, its errors listed."""
        batch_id = new_id("batch")
        now = int(time.time())
        runnable = [p for p in lines if p.body is not None]
        status, errors = "validating", None
        if not runnable:
            status = "failed"
            errors = BatchErrors(
                data=[
                    BatchError(code="invalid_request", message=p.error or "", line=p.line)
                    for p in lines[:100]
                ]
            ).model_dump_json()
        model = runnable[0].body.get("model") if runnable and runnable[0].body else None
        with self._lock, self.db:
            self.db.execute(
                "INSERT INTO batches (id, owner, endpoint, model, input_file_id, "
                "completion_window, status, created_at, expires_at, failed_at, errors, metadata) "
                "VALUES (?, ?, ?, ?, ?, '24h', ?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    owner,
                    endpoint,
                    model if isinstance(model, str) else None,
                    input_file_id,
                    status,
                    now,
                    now + COMPLETION_WINDOW_S,
                    now if status == "failed" else None,
                    errors,
                    json.dumps(metadata) if metadata is not None else None,
                ),
            )
            self.db.executemany(
                "INSERT INTO lines (batch_id, line, custom_id, body, status, result) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(batch_id, *_line_row(p)) for p in lines],
            )
        return batch_id

    def get_batch(self, owner: str | None, batch_id: str) -> BatchObject | None:
        """The batch as the API shows it; owner None: whoever owns it (the runner)."""
        sql = f"SELECT {_BATCH_COLS} FROM batches WHERE id = ?"
        args: tuple[str, ...] = (batch_id,)
        if owner is not None:
            sql += " AND owner = ?"
            args += (owner,)
        with self._lock:
            row = self.db.execute(sql, args).fetchone()
            return self._batch_object(row) if row else None

    def list_batches(
        self, owner: str, *, after: str | None, limit: int
    ) -> tuple[list[BatchObject], bool]:
        """One page of `owner`'s batches, newest first, and whether more follow."""
        sql = f"SELECT {_BATCH_COLS} FROM batches WHERE owner = ?"
        args: list[Any] = [owner]
        if after is not None:
            sql += " AND seq < (SELECT seq FROM batches WHERE id = ? AND owner = ?)"
            args += [after, owner]
        with self._lock:
            rows = self.db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
            out = [self._batch_object(r) for r in rows.fetchall()]
        return out[:limit], len(out) > limit

    def active(self) -> list[Batch]:
        """Batches the runner still has work for, oldest first (any owner)."""
        marks = ", ".join("?" * len(ACTIVE))
        with self._lock:
            rows = self.db.execute(
                "SELECT id, owner, endpoint, status, expires_at FROM batches "
                f"WHERE status IN ({marks}) ORDER BY seq",
                ACTIVE,
            ).fetchall()
        return [Batch(*r) for r in rows]

    def set_status(self, batch_id: str, status: str, *, only_from: tuple[str, ...] = ()) -> bool:
        """Move a batch to `status`, stamping its time; with `only_from`, only from those."""
        sql = f"UPDATE batches SET status = ?, {_STAMP[status]} = ? WHERE id = ?"
        args: list[Any] = [status, int(time.time()), batch_id]
        if only_from:
            sql += f" AND status IN ({', '.join('?' * len(only_from))})"
            args += only_from
        with self._lock, self.db:
            return bool(self.db.execute(sql, args).rowcount)

    # -- lines ---------------------------------------------------------------------------------

    def pending(self, batch_id: str, skip: set[int], limit: int) -> list[PendingLine]:
        """Lines with no result yet, in file order, leaving out those in `skip` (running)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT line, custom_id, body FROM lines "
                "WHERE batch_id = ? AND status IS NULL ORDER BY line LIMIT ?",
                (batch_id, limit + len(skip)),
            ).fetchall()
        out = [PendingLine(n, cid, json.loads(body)) for n, cid, body in rows if n not in skip]
        return out[:limit]

    def save_result(self, batch_id: str, line: int, result: LineResult) -> None:
        with self._lock, self.db:
            self.db.execute(
                "UPDATE lines SET status = ?, result = ?, prompt_tokens = ?, cached_tokens = ?, "
                "completion_tokens = ? WHERE batch_id = ? AND line = ? AND status IS NULL",
                (
                    result.status,
                    result.output.model_dump_json(),
                    result.prompt_tokens,
                    result.cached_tokens,
                    result.completion_tokens,
                    batch_id,
                    line,
                ),
            )

    def finalize(self, batch_id: str, owner: str, status: str) -> None:
        """Write the output and error files from the lines' results and end the batch."""
        if status == "completed":  # cancelled and expired batches end without this step
            self.set_status(batch_id, "finalizing")
        with self._lock:
            rows = self.db.execute(
                "SELECT status, result FROM lines WHERE batch_id = ? AND status IS NOT NULL "
                "ORDER BY line",
                (batch_id,),
            ).fetchall()
        ok = [r for s, r in rows if s == 200]
        failed = [r for s, r in rows if s != 200]
        output_id = self._results_file(owner, f"{batch_id}_output.jsonl", ok)
        error_id = self._results_file(owner, f"{batch_id}_error.jsonl", failed)
        with self._lock, self.db:
            self.db.execute(
                "UPDATE batches SET output_file_id = ?, error_file_id = ? WHERE id = ?",
                (output_id, error_id, batch_id),
            )
        self.set_status(batch_id, status)

    def _results_file(self, owner: str, name: str, lines: list[str]) -> str | None:
        if not lines:
            return None
        data = "".join(line + "\n" for line in lines).encode()
        return self.add_file(owner, name, "batch_output", data).id

    # -- rows to API objects -------------------------------------------------------------------

    def _batch_object(self, row: tuple[Any, ...]) -> BatchObject:
        names = [c.strip() for c in _BATCH_COLS.split(",")]
        r = dict(zip(names, row, strict=True))
        counts, usage = self._counts(r["id"])
        return BatchObject(
            id=r["id"],
            endpoint=r["endpoint"],
            model=r["model"],
            errors=BatchErrors.model_validate_json(r["errors"]) if r["errors"] else None,
            input_file_id=r["input_file_id"],
            completion_window=r["completion_window"],
            status=r["status"],
            output_file_id=r["output_file_id"],
            error_file_id=r["error_file_id"],
            created_at=r["created_at"],
            expires_at=r["expires_at"],
            request_counts=counts,
            usage=usage,
            metadata=json.loads(r["metadata"]) if r["metadata"] else None,
            **{t: r[t] for t in _TIMES},
        )

    def _counts(self, batch_id: str) -> tuple[RequestCounts, BatchUsage]:
        # Called with the lock held.
        total, completed, failed, prompt, cached, completion = self.db.execute(
            "SELECT COUNT(*), COUNT(CASE WHEN status = 200 THEN 1 END), "
            "COUNT(CASE WHEN status != 200 THEN 1 END), TOTAL(prompt_tokens), "
            "TOTAL(cached_tokens), TOTAL(completion_tokens) FROM lines WHERE batch_id = ?",
            (batch_id,),
        ).fetchone()
        counts = RequestCounts(total=total, completed=completed, failed=failed)
        return counts, BatchUsage.of(int(prompt), int(cached), int(completion))


def _file(row: tuple[Any, ...]) -> FileObject:
    file_id, filename, purpose, size, created = row
    return FileObject(
        id=file_id, filename=filename, purpose=purpose, bytes=size, created_at=created
    )


def _line_row(p: ParsedLine) -> tuple[Any, ...]:
    if p.body is not None:
        return (p.line, p.custom_id, json.dumps(p.body, ensure_ascii=False), None, None)
    refused = OutputLine(
        id=new_id("batch_req"),
        custom_id=p.custom_id,
        error=LineError(code="invalid_request", message=p.error or "invalid line"),
    )
    return (p.line, p.custom_id, None, 400, refused.model_dump_json())
