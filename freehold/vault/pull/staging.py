"""Where a pull keeps its bytes until they are verified and stored.

One folder per (source, pinned revision, file) under the vault's temp dir, on the blobs'
filesystem, so a finished download is hard-linked into the vault rather than copied, and a
rerun of the same pull finds its partial files and resumes. The folder is removed once the
model is in the vault.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freehold.config import Paths
from freehold.errors import FreeholdError
from freehold.vault.pull.download import ConnectionLost, DiskFull


def staging_dir(home: Paths, *key: str) -> Path:
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:24]
    return home.tmp / "pull" / digest


# Failures a rerun can pick up from; anything else (a refusal, bad bytes, a bad file) starts
# the next pull clean.
RESUMABLE = (ConnectionLost, DiskFull, KeyboardInterrupt)


@contextmanager
def staging(home: Paths, what: str, *key: str) -> Iterator[Path]:
    """A locked staging folder for `key`: removed on success or a final failure, kept for
    a resumable one (a lost connection, a full disk, Ctrl-C; a SIGKILL leaves it too)."""
    folder = staging_dir(home, *key)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FreeholdError(
                f"another `freehold pull` of {what} is running: wait for it to finish"
            ) from None
        try:
            yield folder
        except RESUMABLE:
            raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    shutil.rmtree(folder, ignore_errors=True)


def clear_stale(home: Paths) -> int:
    """Remove the staging folders of pulls no process is running (abandoned resumes): bytes.

    For `freehold gc`: a pull that will never be rerun should not hold disk forever.
    """
    freed = 0
    for folder in sorted((home.tmp / "pull").glob("*")):
        if not folder.is_dir():
            continue
        lock_path = folder / ".lock"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a pull in progress
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
    return freed
