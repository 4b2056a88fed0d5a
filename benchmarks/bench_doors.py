"""Every front door against OpenAI chat completions, on one `freehold serve` process.

Streamed output tok/s at concurrency 8 (FREEHOLD_BENCH_CONCURRENCY to change) through
`/v1/chat/completions`, `/v1/messages` (Anthropic), `/v1/responses` (OpenAI Responses) and
`/api/chat` (Ollama): SmolLM2-135M-Instruct Q4_1, 2 threads, 8 slots, greedy, at most 128
output tokens, output tokens taken from each API's own final usage. The doors take turns within
each repeat (the first door rotates), so they see the same machine state; each door gets fresh
prompts of the same shape, since a prompt seen before would be served from the prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ServerProcess, free_port, machine, smollm2_path

OUTPUT_TOKENS = 128
REQUESTS_PER_LEVEL = 16
PROMPT_WORDS = 40
WORDS = (
    "river stone light garden window paper market winter silver engine forest music harbor "
    "letter mountain candle bridge orange shadow travel simple yellow morning hammer island"
).split()


def _chat_body(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _chat_usage(event: dict[str, Any]) -> int | None:
    usage = event.get("usage")
    return usage["completion_tokens"] if usage else None


def _messages_body(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "stream": True,
    }


def _messages_usage(event: dict[str, Any]) -> int | None:
    if event.get("type") == "message_delta":
        return event["usage"]["output_tokens"]
    return None


def _responses_body(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "input": text,
        "max_output_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "stream": True,
    }


def _responses_usage(event: dict[str, Any]) -> int | None:
    if event.get("type") in ("response.completed", "response.incomplete"):
        return event["response"]["usage"]["output_tokens"]
    return None


def _ollama_body(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "options": {"num_predict": OUTPUT_TOKENS, "temperature": 0},
        "stream": True,
    }


def _ollama_usage(event: dict[str, Any]) -> int | None:
    return event["eval_count"] if event.get("done") else None


@dataclass(frozen=True)
class Door:
    name: str
    path: str
    body: Callable[[str, str], dict[str, Any]]
    usage: Callable[[dict[str, Any]], int | None]  # output tokens, from the final event


DOORS = (
    Door("/v1/chat/completions", "/v1/chat/completions", _chat_body, _chat_usage),
    Door("/v1/messages", "/v1/messages", _messages_body, _messages_usage),
    Door("/v1/responses", "/v1/responses", _responses_body, _responses_usage),
    Door("/api/chat", "/api/chat", _ollama_body, _ollama_usage),
)


def _events(line: str) -> dict[str, Any] | None:
    """One JSON event from an SSE `data:` line or an NDJSON line; None for anything else."""
    if line.startswith("data: "):
        line = line[6:]
    if not line.startswith("{"):
        return None
    return json.loads(line)


async def _one(client: httpx.AsyncClient, url: str, model: str, door: Door, text: str) -> int:
    tokens = 0
    async with client.stream("POST", url + door.path, json=door.body(model, text)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            event = _events(line)
            if event is not None:
                tokens = door.usage(event) or tokens
    return tokens


async def _level(url: str, model: str, door: Door, texts: list[str], concurrency: int) -> float:
    """Output tok/s of `texts` sent through `door` by `concurrency` closed-loop clients."""
    queue = list(texts)
    counts: list[int] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await _one(client, url, model, door, "warm up")

        async def worker() -> None:
            while queue:
                counts.append(await _one(client, url, model, door, queue.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sum(counts) / (time.perf_counter() - t0)


def _prompts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [
        "Write a long story using these words: "
        + " ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS))
        for _ in range(n)
    ]


def main() -> None:
    repeats = int(os.environ.get("FREEHOLD_BENCH_REPEATS", "5"))
    concurrency = int(os.environ.get("FREEHOLD_BENCH_CONCURRENCY", "8"))
    work = Path(tempfile.mkdtemp(prefix="freehold-bench-doors-"))
    port = free_port()
    cmd = [sys.executable, "-m", "freehold", "serve", "--model", str(smollm2_path())]
    cmd += ["--port", str(port), "--threads", "2", "--slots", "8", "--ctx", "1024"]
    env = {**os.environ, "FREEHOLD_HOME": str(work / "home")}
    server = ServerProcess("freehold", cmd, port, work / "freehold.log", env=env)
    runs: dict[str, list[float]] = {d.name: [] for d in DOORS}
    with server:
        for r in range(repeats):
            order = DOORS[r % len(DOORS) :] + DOORS[: r % len(DOORS)]
            for i, door in enumerate(order):
                texts = _prompts(REQUESTS_PER_LEVEL, seed=100 * r + i)
                runs[door.name].append(
                    asyncio.run(_level(server.url, server.model, door, texts, concurrency))
                )
    _report(runs, repeats, concurrency)


def _report(runs: dict[str, list[float]], repeats: int, concurrency: int) -> None:
    base = runs[DOORS[0].name]
    print(f"Machine: {machine()}")
    print(
        f"{repeats} repeats x {REQUESTS_PER_LEVEL} streamed requests per door, concurrency "
        f"{concurrency}, <= {OUTPUT_TOKENS} output tokens, greedy\n"
    )
    print("| door | median output tok/s | median ratio to chat completions | per-repeat ratios |")
    print("|---|---|---|---|")
    for door in DOORS:
        tok_s = runs[door.name]
        ratios = [t / b for t, b in zip(tok_s, base, strict=True)]
        per = ", ".join(f"{x:.2f}" for x in ratios)
        print(
            f"| `{door.name}` | {statistics.median(tok_s):.1f} | "
            f"{statistics.median(ratios):.3f}x | {per} |"
        )


if __name__ == "__main__":
    main()
