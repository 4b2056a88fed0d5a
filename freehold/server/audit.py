"""The audit log: one JSON line per API request — who, from where, which model, how much.

Prompts are recorded only as a sha256 (so a known prompt can be matched, but nothing can be
read back); prompt and completion text are written only with `--log-content`. Lines are written
by a background thread so the request path never waits on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from freehold.server.writer import BatchWriter


def prompt_digest(prompt: Any) -> str:
    """sha256 of the prompt as canonical JSON (messages or prompt text, as sent)."""
    blob = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # Request bodies are checked for lone surrogates before any door reads them; should one get
    # here anyway, it is hashed as its code unit rather than failing the request.
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class AuditLog(BatchWriter):
    def __init__(self, path: Path, *, log_content: bool = False) -> None:
        self.path = path
        self.log_content = log_content
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only: even without content, the log says who used what and when.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # backslashreplace: a lone surrogate in a string becomes the six characters `\udXXX`,
        # which inside a JSON string is the very escape that reads back as that string; so no
        # text can make a line fail to write, and every line stays valid UTF-8 JSON.
        self._file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
        super().__init__("freehold-audit")

    def write(self, entry: dict[str, Any]) -> None:
        """Queue one entry. Callers add "prompt"/"completion" only when `log_content` is set."""
        self._put(entry)

    def _write_batch(self, items: list[Any]) -> None:
        for e in items:
            self._file.write(json.dumps(e, ensure_ascii=False, default=str) + "\n")
        self._file.flush()

    def _close_sink(self) -> None:
        self._file.close()
