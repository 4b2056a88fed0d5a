"""Models reach a cluster's nodes by content address, not through a shared filesystem.

The gateway's node holds the vault. A `BlobSource` actor, pinned to that node, serves each file
a served model needs (weights, adapters) by its sha256, in chunks, each with its own sha256. A
replica on another node fetches the chunks into a temp file in its node-local cache, checks
every chunk as it arrives (a corrupted one is refused and asked for again), checks the whole
file's sha256, and renames it to `<cache>/sha256-<hex>`. Later replicas on that node find it
there. Nothing half-fetched is ever visible under a final name. (Ray's `runtime_env` packages
are capped at 512 MiB: not a way to move weights.)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from freehold.errors import FreeholdError, IntegrityError
from freehold.vault.blobs import hash_file

CHUNK_BYTES = 16 << 20
CHUNK_TRIES = 3
DEFAULT_NODE_CACHE = Path.home() / ".cache" / "freehold" / "replica-models"


@dataclass(frozen=True)
class Blob:
    """One file a replica needs, named by what it holds."""

    sha256: str  # hex
    size: int
    name: str  # the file's name on the gateway, for messages

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // CHUNK_BYTES))


def describe(path: Path) -> Blob:
    """The content address of a local file: vault blobs are named by it, others are hashed."""
    name = path.resolve().name
    digest = name.removeprefix("sha256-")
    if not (name.startswith("sha256-") and len(digest) == 64):
        digest = hash_file(path)[0].removeprefix("sha256:")
    return Blob(digest, path.stat().st_size, path.name)


class BlobSource:
    """Serves the gateway's files by sha256 (a Ray actor on the gateway's node)."""

    def __init__(self) -> None:
        self._files: dict[str, Path] = {}

    def offer(self, sha256: str, path: str) -> None:
        self._files[sha256] = Path(path)

    def chunk(self, sha256: str, index: int) -> tuple[bytes, str]:
        """Chunk `index` of a file and its own sha256."""
        path = self._files.get(sha256)
        if path is None:
            raise FreeholdError(f"the gateway does not offer sha256:{sha256}")
        with open(path, "rb") as f:
            f.seek(index * CHUNK_BYTES)
            data = f.read(CHUNK_BYTES)
        return data, hashlib.sha256(data).hexdigest()


ReadChunk = Callable[[int], tuple[bytes, str]]


def fetch(blob: Blob, read_chunk: ReadChunk, cache: Path) -> Path:
    """`blob` in the node cache, fetched and verified if it is not there yet."""
    final = cache / f"sha256-{blob.sha256}"
    if final.is_file() and final.stat().st_size == blob.size:
        return final
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{blob.sha256[:16]}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            whole = hashlib.sha256()
            for index in range(blob.chunks):
                data = _verified_chunk(blob, read_chunk, index)
                whole.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != blob.sha256:
            raise IntegrityError(
                f"{blob.name} arrived whole but hashes to sha256:{whole.hexdigest()}, not "
                f"sha256:{blob.sha256}; the gateway's copy may be damaged: run "
                "`freehold verify` there"
            )
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def _verified_chunk(blob: Blob, read_chunk: ReadChunk, index: int) -> bytes:
    """A chunk whose bytes hash to the digest the gateway computed; corrupted ones are
    refused and fetched again."""
    for _ in range(CHUNK_TRIES):
        data, digest = read_chunk(index)
        expected = min(CHUNK_BYTES, blob.size - index * CHUNK_BYTES)
        if len(data) == expected and hashlib.sha256(data).hexdigest() == digest:
            return data
    raise IntegrityError(
        f"chunk {index} of {blob.name} arrived corrupted {CHUNK_TRIES} times in a row; "
        "check the network between this node and the gateway"
    )
