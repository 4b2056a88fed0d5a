"""What `freehold serve` was asked for: address, models, capacity, security and logging."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freehold.cluster.ray_serve import ClusterPlan
from freehold.cluster.routing import UpstreamSpec
from freehold.cluster.routing import parse_upstreams as parse_upstreams  # with parse_aliases
from freehold.config import Paths, paths
from freehold.errors import InvalidInput

DEFAULT_PORT = 8642


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models: list[str] = field(default_factory=list)  # ids as clients name them
    aliases: dict[str, str] = field(default_factory=dict)  # other names for them (--alias)
    eager: list[str] | None = None  # loaded at start; None: all of `models`
    slots: int | None = None  # per model; None: the engine sizes from RAM
    max_queue: int = 32  # per model, waiting beyond the slots
    threads: int | None = None
    ctx: int | None = None  # tokens per slot
    max_tokens: int | None = None  # generated tokens for requests that set no limit; None: ctx
    insecure_no_auth: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_content: bool = False
    store_responses: bool = False  # keep Responses API results (store: true) in SQLite
    max_body_bytes: int = 8 << 20
    drain_timeout_s: float = 60.0
    chat_template: str | None = None  # `--chat-template` NAME|FILE for every served model
    load_wait_s: float = 60.0  # a request waits this long for its model to load, then 503
    cache_ram_bytes: int | None = None  # prompt cache in host memory; None: from free RAM; 0: off
    gpu_layers: int | str = "auto"  # `--gpu-layers` for every served model: auto, N or 0
    # Models served by other OpenAI-compatible servers (`--upstream`, see parse_upstreams).
    upstreams: list[UpstreamSpec] = field(default_factory=list)
    # Serve the local models' replicas on a Ray cluster (`--cluster`); None: in this process.
    cluster: ClusterPlan | None = None
    home: Paths = field(default_factory=paths)

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidInput(f"--port must be 1-65535, got {self.port}")
        if self.slots is not None and self.slots < 1:
            raise InvalidInput(f"--slots must be at least 1, got {self.slots}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInput(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.load_wait_s < 0:
            raise InvalidInput(f"--load-wait must be 0 or more seconds, got {self.load_wait_s}")
        if self.max_queue < 0:
            raise InvalidInput(f"--max-queue must be 0 or more, got {self.max_queue}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("--tls-cert and --tls-key go together")
        for p in (self.tls_cert, self.tls_key):
            if p is not None and not p.is_file():
                raise InvalidInput(f"TLS file {p} does not exist")

    def apply_saved(self, saved: dict[str, Any]) -> None:
        """Defaults from settings.json's "server" section; what the command line set wins."""
        aliases = saved.get("aliases", {})
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
        ):
            raise InvalidInput("settings.json: server.aliases must map names to model names")
        self.aliases = {**aliases, **self.aliases}
        self.store_responses = self.store_responses or bool(saved.get("store_responses", False))

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_aliases(items: list[str]) -> dict[str, str]:
    """`NAME=MODEL` pairs from `--alias` (repeatable)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, model = (part.strip() for part in item.partition("="))
        if not sep or not name or not model:
            raise InvalidInput(
                f"--alias takes NAME=MODEL (e.g. claude-sonnet-4-5=smollm2), got {item!r}"
            )
        out[name] = model
    return out
