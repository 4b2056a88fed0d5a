"""Content-addressed blob store: every byte written is hashed on the way in, once.

Blobs live at `blobs/sha256-<hex>`, read-only. A write goes to a temp file beside the store,
is fsynced, and renamed into place only once its digest is known, so a crash or a SIGKILL
mid-copy leaves at most a stray temp file (removed by `gc`) and never a partial blob.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from freehold.errors import IntegrityError, InvalidInput, NotFound

CHUNK = 8 << 20  # large reads keep per-call overhead negligible next to hashing
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

Progress = Callable[[int], None]  # called with the number of bytes just processed


@dataclass(frozen=True)
class StagedBlob:
    """A fully written, fsynced temp file whose digest is known but not yet in the store."""

    tmp_path: Path
    digest: str
    size: int


def check_digest(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise InvalidInput(
            f"'{digest}' is not a sha256 digest (expected 'sha256:' + 64 hex digits)"
        )
    return digest


def hash_file(path: Path, progress: Progress | None = None) -> tuple[str, int]:
    """sha256 digest and size of a file, read once."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in _chunks(f):
            h.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return "sha256:" + h.hexdigest(), size


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """sha256-addressed files under `root`, with temp files in `tmp` on the same filesystem."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp

    def path(self, digest: str) -> Path:
        return self.root / check_digest(digest).replace(":", "-")

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def digests(self) -> Iterator[str]:
        for p in sorted(self.root.glob("sha256-*")):
            yield p.name.replace("-", ":", 1)

    # -- writing ---------------------------------------------------------------------------

    def stage(
        self,
        chunks: Iterable[bytes],
        expected: str | None = None,
        progress: Progress | None = None,
    ) -> StagedBlob:
        """Copy a stream of chunks to a temp file, hashing it in the same pass.

        Hashing runs in a worker thread while the main thread writes the previous chunk
        (hashlib releases the GIL), so a copy costs about as much as hashing alone.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="blob-", suffix=".partial", dir=self.tmp)
        tmp_path = Path(name)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until we close or die: tells gc it is live
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, ThreadPoolExecutor(1) as pool:
                pending = None
                for chunk in chunks:
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(h.update, chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
                if pending is not None:
                    pending.result()
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        digest = "sha256:" + h.hexdigest()
        if expected is not None and digest != expected:
            tmp_path.unlink(missing_ok=True)
            raise IntegrityError(
                f"content hashes to {digest} but its source says {expected}; the source is "
                "corrupt or was changed: fetch it again"
            )
        return StagedBlob(tmp_path, digest, size)

    def stage_file(
        self, path: Path, expected: str | None = None, progress: Progress | None = None
    ) -> StagedBlob:
        with open(path, "rb") as f:
            return self.stage(_chunks(f), expected, progress)

    def stage_files(
        self, paths: list[Path], expected: str | None = None, progress: Progress | None = None
    ) -> StagedBlob:
        """Concatenate files (a model split into chunks) into one staged blob."""

        def all_chunks() -> Iterator[bytes]:
            for p in paths:
                with open(p, "rb") as f:
                    yield from _chunks(f)

        return self.stage(all_chunks(), expected, progress)

    def stage_link(
        self, path: Path, progress: Progress | None = None, known_digest: str | None = None
    ) -> StagedBlob:
        """Hard-link a file into the temp area instead of copying it.

        It is hashed here unless `known_digest` is given: the caller hashed the bytes as it wrote
        them (a download), and reading hundreds of MB again would only check that check.
        """
        if known_digest is None:
            digest, size = hash_file(path, progress)
        else:
            digest, size = known_digest, path.stat().st_size
            if progress is not None:
                progress(size)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp_path = self.tmp / f"link-{os.getpid()}-{digest[7:23]}.partial"
        tmp_path.unlink(missing_ok=True)
        try:
            os.link(path, tmp_path)
        except OSError as e:
            raise InvalidInput(
                f"cannot hard-link {path} into the vault ({e.strerror}); it must be on the same "
                "filesystem as FREEHOLD_HOME: drop --link to copy it instead"
            ) from e
        return StagedBlob(tmp_path, digest, size)

    def commit(self, staged: StagedBlob) -> Path:
        """Move a staged blob into place; if the store already has it, drop the duplicate."""
        final = self.path(staged.digest)
        if final.exists():
            staged.tmp_path.unlink(missing_ok=True)
            return final
        os.chmod(staged.tmp_path, 0o444)
        os.replace(staged.tmp_path, final)
        _fsync_dir(self.root)
        return final

    def discard(self, staged: StagedBlob) -> None:
        staged.tmp_path.unlink(missing_ok=True)

    # -- reading and checking --------------------------------------------------------------

    def read_bytes(self, digest: str) -> bytes:
        p = self.path(digest)
        if not p.is_file():
            raise NotFound(f"blob {digest} is missing from the vault: run `freehold verify`")
        return p.read_bytes()

    def verify(self, digest: str, progress: Progress | None = None) -> str:
        """'ok', 'missing' or 'corrupt'."""
        p = self.path(digest)
        if not p.is_file():
            return "missing"
        actual, _ = hash_file(p, progress)
        return "ok" if actual == digest else "corrupt"

    def remove(self, digest: str) -> int:
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
            return size
        except FileNotFoundError:
            return 0

    def clear_temp(self) -> int:
        """Remove temp files left by interrupted writes (no live writer holds their lock)."""
        freed = 0
        for p in self.tmp.glob("*.partial"):
            try:
                with open(p, "rb") as f:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a write in progress
                    freed += os.fstat(f.fileno()).st_size
                    p.unlink()
            except FileNotFoundError:
                pass
        return freed


@contextmanager
def staged_cleanup(store: BlobStore, staged: list[StagedBlob]) -> Iterator[None]:
    """Discard every staged blob if the block fails, so nothing half-done stays behind."""
    try:
        yield
    except BaseException:
        for s in staged:
            store.discard(s)
        raise
