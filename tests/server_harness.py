"""Run a real Freehold server in-process (uvicorn in a thread) for the server tests."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from freehold.config import paths
from freehold.server.app import create_app
from freehold.server.lifecycle import DrainingServer, build_pool, uvicorn_config
from freehold.server.services import Services
from freehold.server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    base: str  # http://127.0.0.1:PORT
    services: Services
    home: Path

    @property
    def v1(self) -> str:
        return self.base + "/v1"


def wait_ready(
    base: str,
    timeout: float = 120.0,
    headers: dict[str, str] | None = None,
    verify: bool | ssl.SSLContext = True,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(base + "/ready", headers=headers, timeout=5, verify=verify)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {base} not ready after {timeout}s")


@contextmanager
def running_server(
    home: Path, models: dict[str, Path], ready_headers: dict[str, str] | None = None, **kw: Any
) -> Iterator[Running]:
    kw.setdefault("threads", 2)
    kw.setdefault("ctx", 1024)
    settings = ServerSettings(port=free_port(), models=list(models), home=paths(home), **kw)
    app = create_app(settings, build_pool(settings, models))
    server = DrainingServer(uvicorn_config(settings, app), app.state.services)
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    base = f"{settings.scheme}://127.0.0.1:{settings.port}"
    verify = ssl.create_default_context(cafile=settings.tls_cert) if settings.tls_cert else True
    try:
        wait_ready(base, headers=ready_headers, verify=verify)
        yield Running(base, app.state.services, home)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
