"""A soak: `freehold serve` under mixed load for a bounded time, then nothing leaked.

Clients send chat and completions, streamed and not, and embeddings; a third of the streams
hang up after the first chunk. Meanwhile a second model is loaded and unloaded again through
Ollama's `keep_alive: 0`. Afterwards: no request holds a slot, the server's memory (less the
prompt cache, which is meant to fill up to its budget) is within 10% of what it was after
warm-up, the p99 time to first token of the last minute is within 1.5x of the first's, and the
ledger holds exactly one row per request sent.

`make test` runs 2 minutes; `pytest tests/test_server_soak.py --soak-minutes 30` runs longer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import free_port, wait_ready

CLIENTS = 6
RELOAD_EVERY_S = 20.0
WARM_UP_S = 70.0
WORDS = "river stone light garden window paper market winter silver engine forest music".split()


@dataclass
class Tally:
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (when, seconds)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


def _settled_rss(pid: int, base: str, second: str) -> int:
    """Resident memory less the prompt cache, once the second model has unloaded again."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(base + "/ready", timeout=10).json()["models"][second]
        if state != "loaded":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"{second} did not unload after keep_alive 0")
    return _rss(pid) - int(_metric(base, "freehold_prompt_cache_bytes"))


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict, hang_up: bool, tally: Tally, t0: float
) -> None:
    started = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            tally.failed.append(f"{url}: {r.status_code}")
            return
        first = True
        async for line in r.aiter_lines():
            if first and line.startswith("data: {"):
                first = False
                tally.ttfts.append((started - t0, time.perf_counter() - started))
                if hang_up:
                    return  # closing the stream mid-way: the client hangs up


async def _client(
    base: str, model: str, deadline: float, seed: int, tally: Tally, t0: float
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=120, trust_env=False) as client:
        while time.perf_counter() < deadline:
            kind = rng.choice(["chat", "chat-stream", "text", "text-stream", "embed"])
            text = _text(rng, rng.randint(5, 60))
            tally.sent += 1
            if kind == "embed":
                r = await client.post("/v1/embeddings", json={"model": model, "input": text})
                if r.status_code != 200:
                    tally.failed.append(f"embed: {r.status_code}")
                continue
            chat = kind.startswith("chat")
            body: dict = {"model": model, "max_tokens": rng.randint(4, 24), "temperature": 0.7}
            if chat:
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = text
            url = "/v1/chat/completions" if chat else "/v1/completions"
            if kind.endswith("stream"):
                body["stream"] = True
                await _stream(client, url, body, rng.random() < 1 / 3, tally, t0)
            else:
                r = await client.post(url, json=body)
                if r.status_code != 200:
                    tally.failed.append(f"{url}: {r.status_code} {r.text[:200]}")


async def _reloader(base: str, model: str, deadline: float, tally: Tally) -> None:
    """Load the second model, use it once and let it unload (`keep_alive: 0`), again and again."""
    body = {"model": model, "prompt": "Once upon", "raw": True, "stream": False,
            "keep_alive": 0, "options": {"num_predict": 2}}  # fmt: skip
    async with httpx.AsyncClient(base_url=base, timeout=300, trust_env=False) as client:
        while time.perf_counter() < deadline - RELOAD_EVERY_S:
            await asyncio.sleep(RELOAD_EVERY_S / 2)
            tally.sent += 1
            r = await client.post("/api/generate", json=body)
            if r.status_code != 200:
                tally.failed.append(f"reload: {r.status_code} {r.text[:200]}")
            await asyncio.sleep(RELOAD_EVERY_S / 2)


async def _load(base: str, models: list[str], seconds: float, tally: Tally) -> None:
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(
        *(_client(base, models[0], deadline, i, tally, t0) for i in range(CLIENTS)),
        _reloader(base, models[1], deadline, tally),
    )


@pytest.fixture
def soak_minutes(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--soak-minutes"))


def test_soak_leaks_nothing(
    smollm2_path: Path, gemma_path: Path, tmp_path: Path, soak_minutes: float
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FREEHOLD_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "freehold", "serve", "--model", str(smollm2_path),
           "--model", str(gemma_path), "--port", str(port), "--slots", "4", "--threads", "2",
           "--ctx", "512", "--cache-ram", "64M"]  # fmt: skip
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(base, timeout=180)
        models = [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]]
        warm = Tally()
        # Every path, and a few loads of the second model: allocator arenas and caches settle.
        asyncio.run(_load(base, models, WARM_UP_S, warm))
        rss_warm = _settled_rss(proc.pid, base, models[1])

        tally = Tally()
        seconds = soak_minutes * 60.0
        asyncio.run(_load(base, models, seconds, tally))
        time.sleep(1.0)  # hung-up requests finish within a decode step
        assert _metric(base, "freehold_requests_running") == 0
        rss_end = _settled_rss(proc.pid, base, models[1])
        print(f"soak: rss warm {rss_warm / 2**20:.0f} MiB, end {rss_end / 2**20:.0f} MiB")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not tally.failed and not warm.failed, (tally.failed + warm.failed)[:10]
    grew = f"memory grew from {rss_warm / 2**20:.0f} to {rss_end / 2**20:.0f} MiB"
    assert rss_end <= rss_warm * 1.10, grew

    window = min(60.0, seconds / 2)
    first = [t for when, t in tally.ttfts if when < window]
    last = [t for when, t in tally.ttfts if when >= seconds - window]
    p99_first, p99_last = np.percentile(first, 99), np.percentile(last, 99)
    median = np.median([t for _, t in tally.ttfts])
    print(f"soak: {tally.sent} requests in {soak_minutes:g} min, TTFT median {median:.3f}s, "
          f"p99 first minute {p99_first:.3f}s, last {p99_last:.3f}s")  # fmt: skip
    assert p99_last <= 1.5 * p99_first, f"TTFT p99 {p99_first:.3f}s then {p99_last:.3f}s"

    with sqlite3.connect(tmp_path / "home" / "ledger.db") as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM requests").fetchone()
    assert rows == warm.sent + tally.sent
