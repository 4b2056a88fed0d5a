"""A small model hub on 127.0.0.1 for tests and benchmarks: Hugging Face and Ollama registry.

It answers what `freehold pull` (through huggingface_hub) asks a Hugging Face hub, and the
OCI distribution routes of Ollama's registry:

- `GET /api/models/ORG/REPO[/revision/REV]`: the listing, with each file's size, git blob id
  and, for LFS files (*.gguf, *.safetensors), the LFS sha256;
- `GET|HEAD /ORG/REPO/resolve/REV/PATH`: the file, with Range support, `ETag`,
  `X-Linked-Etag`, `X-Repo-Commit`;
- `GET /v2/NS/NAME/manifests/TAG`, `GET /v2/NS/NAME/blobs/DIGEST`.

Switches a test flips at any time: `gated` repos answer 401 without the right token,
`corrupt` names files served with one byte changed, `rate` slows every body to that many
bytes a second (so a pull can be killed halfway), `drop_after` closes the connection after
that many bytes of a body. Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf

Content = bytes | Path
LFS_RE = re.compile(r"\.(gguf|safetensors)$")
TOKEN = "hf_test_token_for_the_loopback_hub"


def _size(c: Content) -> int:
    return len(c) if isinstance(c, bytes) else c.stat().st_size


def _sha256(c: Content) -> str:
    if isinstance(c, bytes):
        return hashlib.sha256(c).hexdigest()
    h = hashlib.sha256()
    with open(c, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read(c: Content, offset: int, n: int) -> bytes:
    if isinstance(c, bytes):
        return c[offset : offset + n]
    with open(c, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _git_blob_id(c: Content) -> str:
    data = c if isinstance(c, bytes) else c.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, Content]
    commit: str = ""
    gated: bool = False
    card_license: str | None = None
    _sums: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = "\0".join(sorted(self.files)).encode()
        self.commit = self.commit or hashlib.sha1(self.repo_id.encode() + names).hexdigest()
        self._sums = {n: _sha256(c) for n, c in self.files.items() if LFS_RE.search(n)}

    def info(self) -> dict:
        siblings = []
        for name, content in sorted(self.files.items()):
            s: dict = {"rfilename": name, "size": _size(content)}
            if name in self._sums:
                s["blobId"] = hashlib.sha1(self._sums[name].encode()).hexdigest()
                s["lfs"] = {"size": _size(content), "sha256": self._sums[name], "pointerSize": 134}
            else:
                s["blobId"] = _git_blob_id(content)
            siblings.append(s)
        card = {"license": self.card_license} if self.card_license else {}
        return {
            "id": self.repo_id,
            "modelId": self.repo_id,
            "sha": self.commit,
            "private": False,
            "gated": "manual" if self.gated else False,
            "disabled": False,
            "tags": ["gguf"],
            "cardData": card,
            "siblings": siblings,
        }

    def etag(self, name: str) -> str:
        return self._sums.get(name) or _git_blob_id(self.files[name])


class Hub:
    """Start with `with Hub() as hub:`; `hub.url` is its base URL."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.blobs: dict[str, Content] = {}
        self.corrupt: set[str] = set()  # file names or blob digests served with a byte changed
        self.rate: float | None = None  # bytes per second, when set
        self.drop_after: int | None = None  # close the connection after this many body bytes
        self.requests: list[dict[str, str | None]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Hub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo

    def add_ollama(self, name: str, tag: str, layers: list[tuple[str, Content]]) -> bytes:
        """Publish `library/NAME:TAG` with (mediaType, content) layers; returns its manifest."""
        entries = []
        for media, content in layers:
            digest = "sha256:" + _sha256(content)
            self.blobs[digest] = content
            entries.append({"mediaType": media, "digest": digest, "size": _size(content)})
        config = b"{}"
        self.blobs["sha256:" + _sha256(config)] = config
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "sha256:" + _sha256(config),
                "size": len(config),
            },
            "layers": entries,
        }
        raw = json.dumps(manifest).encode()
        self.manifests[(f"library/{name}", tag)] = raw
        return raw

    def ranges_asked(self, path_part: str) -> list[str | None]:
        return [r["range"] for r in self.requests if path_part in str(r["path"])]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._route(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._route(body=True)

        def _route(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            hub.requests.append(
                {"method": self.command, "path": path, "range": self.headers.get("Range")}
            )
            try:
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    return self._info(m[1], m[2] or "main")
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._resolve(m[1], m[2], m[3], body)
                if m := re.fullmatch(r"/v2/([^/]+/[^/]+)/manifests/([^/]+)", path):
                    return self._manifest(m[1], m[2])
                if m := re.fullmatch(r"/v2/([^/]+/[^/]+)/blobs/(sha256:[0-9a-f]{64})", path):
                    if m[2] in hub.blobs:
                        return self._send(hub.blobs[m[2]], m[2], body, {})
                self._error(404, "EntryNotFound")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away (a killed pull)

        def _error(self, status: int, code: str) -> None:
            payload = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, data: object) -> None:
            self._send(json.dumps(data).encode(), "", True, {"Content-Type": "application/json"})

        def _repo(self, repo_id: str, rev: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            if rev not in ("main", repo.commit):
                self._error(404, "RevisionNotFound")
                return None
            return repo

        def _info(self, repo_id: str, rev: str) -> None:
            if repo := self._repo(repo_id, rev):
                self._json(repo.info())

        def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._error(401, "GatedRepo")
            if name not in repo.files:
                return self._error(404, "EntryNotFound")
            etag = repo.etag(name)
            headers = {
                "ETag": f'"{etag}"',
                "X-Linked-Etag": f'"{etag}"',
                "X-Repo-Commit": repo.commit,
                "X-Linked-Size": str(_size(repo.files[name])),
            }
            self._send(repo.files[name], name, body, headers)

        def _manifest(self, repo: str, tag: str) -> None:
            raw = hub.manifests.get((repo, tag))
            if raw is None:
                return self._error(404, "MANIFEST_UNKNOWN")
            media = {"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}
            self._send(raw, "", True, media)

        def _send(self, content: Content, key: str, body: bool, headers: dict[str, str]) -> None:
            size = _size(content)
            start, end = 0, size - 1
            status = 200
            if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or ""):
                start, end = int(m[1]), int(m[2]) if m[2] else size - 1
                status = 206
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                self._body(content, key, start, end + 1)

        def _body(self, content: Content, key: str, start: int, stop: int) -> None:
            plain = hub.rate is None and hub.drop_after is None
            if key not in hub.corrupt and plain and isinstance(content, Path):
                with open(content, "rb") as f:  # the kernel copies: as fast as the hub can be
                    self.connection.sendfile(f, start, stop - start)
                return
            if hub.drop_after is not None and start + hub.drop_after < stop:
                stop = start + hub.drop_after  # a lost connection: less than Content-Length
                self.close_connection = True
            flip = _size(content) // 2  # the byte `corrupt` changes
            step = 1 << 20
            for at in range(start, stop, step):
                chunk = bytearray(_read(content, at, min(step, stop - at)))
                if key in hub.corrupt and at <= flip < at + len(chunk):
                    chunk[flip - at] ^= 0x01
                self.wfile.write(chunk)
                if hub.rate:
                    time.sleep(len(chunk) / hub.rate)

    return Handler


def write_split(source: Path, out_dir: Path, parts: int) -> list[Path]:
    """Split a GGUF into `parts` files in llama.cpp's gguf-split layout (split.* keys)."""
    reader = gguf.GGUFReader(source)
    arch = str(reader.get_field("general.architecture").contents())
    per_part = -(-len(reader.tensors) // parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_dir / source.name, arch, split_max_tensors=per_part)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return sorted(out_dir.glob("*-of-*.gguf"))
