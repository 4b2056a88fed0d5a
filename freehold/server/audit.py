"""The audit log: one JSON line per API request — who, from where, which model, how much.

Prompts are recorded only as a sha256 (so a known prompt can be matched, but nothing can be
read back); prompt and completion text are written only with `--log-content`. Lines are written
by a background thread so the request path never waits on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any

_STOP = object()


def prompt_digest(prompt: Any) -> str:
    """sha256 of the prompt as canonical JSON (messages or prompt text, as sent)."""
    blob = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path, *, log_content: bool = False) -> None:
        self.path = path
        self.log_content = log_content
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only: even without content, the log says who used what and when.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="freehold-audit", daemon=True)
        self._thread.start()

    def write(self, entry: dict[str, Any]) -> None:
        """Queue one entry. Callers add "prompt"/"completion" only when `log_content` is set."""
        with self._idle:
            self._pending += 1
        self._queue.put(entry)

    def flush(self, timeout: float = 10.0) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
        self._file.close()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            entries = [e for e in batch if e is not _STOP]
            for e in entries:
                self._file.write(json.dumps(e, ensure_ascii=False) + "\n")
            self._file.flush()
            with self._idle:
                self._pending -= len(entries)
                self._idle.notify_all()
            if len(entries) != len(batch):
                return
