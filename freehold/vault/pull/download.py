"""A resumable, verified download: bytes are hashed as they are written, in one pass.

The file grows in a staging folder under the vault's temp dir. A rerun after a kill hashes
the bytes already there, asks the server for the rest with an HTTP Range request, and goes
on hashing from where it stopped, so every byte is read from disk or network exactly once.
Only a file whose digest matches the one its source published is handed back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from freehold.errors import FreeholdError, IntegrityError

HASH_BACKLOG = 256  # pieces (about 64 KiB each) received but not hashed yet: bounded memory
Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], Advance]


class HttpClient(Protocol):
    """What a download needs of a client: `httpx.Client` and huggingface_hub's session fit."""

    def stream(self, method: str, url: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Remote:
    """One file to fetch: where from, what it must hash to, and how big it is."""

    url: str
    digest: str  # "sha256:<hex>", or "gitsha1:<hex>" for a small file kept in git (not LFS)
    size: int | None
    label: str  # what error messages call it, e.g. "model.Q4_K_M.gguf from huggingface.co"


class ConnectionLost(FreeholdError):
    """The server went away mid-transfer; what arrived is kept for the next run."""


class DiskFull(FreeholdError):
    """No space left for the download; what arrived is kept for the next run."""


class HttpStatus(FreeholdError):
    """The server refused the file; `status` lets the caller say why in its own words."""

    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"{url} answered HTTP {status}")
        self.status = status


def new_hasher(digest: str, size: int | None) -> Any:
    """A hash object for `digest`'s algorithm; git's blob id hashes a header first."""
    if digest.startswith("gitsha1:") and size is not None:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % size)
        return h
    return hashlib.sha256()


def _hexdigest_as(digest: str, h: Any) -> str:
    return digest.partition(":")[0] + ":" + h.hexdigest()


def _hash_existing(path: Path, h: Any, advance: Advance) -> int:
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
            advance(len(chunk))
    return size


def _resume_offset(path: Path, remote: Remote, h: Any, advance: Advance) -> int:
    """Bytes already on disk worth keeping (hashed into `h`); 0 starts clean."""
    if not path.is_file():  # nothing yet (or not a regular file: write through it)
        return 0
    have = path.stat().st_size
    if remote.size is not None and have > remote.size:
        path.unlink()
        return 0
    return _hash_existing(path, h, advance)


def _write_hashing(chunks: Iterator[bytes], out: Any, h: Any, advance: Advance) -> None:
    """Write each piece as it arrives while a second thread hashes it (hashlib and file
    writes release the GIL, so receiving, hashing and writing overlap)."""
    pieces: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_BACKLOG)

    def hash_pieces() -> None:
        while (piece := pieces.get()) is not None:
            h.update(piece)

    hasher = threading.Thread(target=hash_pieces, name="pull-hash", daemon=True)
    hasher.start()
    try:
        for piece in chunks:
            pieces.put(piece)
            out.write(piece)
            advance(len(piece))
    finally:
        pieces.put(None)
        hasher.join()


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of httpx and of huggingface_hub's own client (httpx2 in 2.x)."""
    import httpx

    found: list[type[BaseException]] = [httpx.TransportError]
    try:
        import httpx2  # type: ignore[import-not-found]

        found.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(found)


def _fetch_rest(
    client: HttpClient, remote: Remote, path: Path, offset: int, h: Any, advance: Advance
) -> Any:
    """Append the missing bytes to `path`; returns the hash of the whole file's bytes."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", remote.url, headers=headers, follow_redirects=True) as r:
        if r.status_code >= 400:
            raise HttpStatus(r.status_code, remote.url)
        resumed = bool(offset) and r.status_code == 206
        if resumed and not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            path.unlink()
            raise FreeholdError(
                f"the server sent another part of {remote.label} than asked for; the partial "
                "download was dropped: run the same `freehold pull` again"
            )
        if offset and not resumed:  # the server ignored Range: start over
            h = new_hasher(remote.digest, remote.size)
            advance(-offset)
        with open(path, "ab" if resumed else "wb") as out:
            # Pieces as the connection yields them: re-chunking would copy every byte again.
            _write_hashing(r.iter_raw(), out, h, advance)
            out.flush()
            os.fsync(out.fileno())
    return h


def download(client: HttpClient, remote: Remote, path: Path, progress: ProgressFactory) -> Path:
    """Fetch `remote` into `path` (resuming what is there) and check its digest.

    Returns `path`, complete and verified. A mismatch deletes the file (a clean start next
    time); a lost connection or a full disk keeps it, so a rerun resumes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    h = new_hasher(remote.digest, remote.size)
    advance = progress(f"Pulling {path.name}", remote.size or 0)
    offset = _resume_offset(path, remote, h, advance)
    try:
        if remote.size is None or offset < remote.size:
            h = _fetch_rest(client, remote, path, offset, h, advance)
    except transport_errors() as e:
        raise ConnectionLost(
            f"lost the connection while fetching {remote.label} ({type(e).__name__}: {e}); "
            "what arrived is kept: run the same `freehold pull` again to resume"
        ) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFull(
                f"the disk is full while writing {path} ({remote.size or '?'} bytes needed): "
                "free space and run the same `freehold pull` again to resume"
            ) from None
        raise
    digest = _hexdigest_as(remote.digest, h)
    if digest != remote.digest:
        path.unlink(missing_ok=True)
        raise IntegrityError(
            f"{remote.label} hashes to {digest} but its source publishes {remote.digest}: "
            "the download was corrupted (or the file changed upstream); nothing was stored, "
            "run `freehold pull` again to fetch it fresh"
        )
    return path
