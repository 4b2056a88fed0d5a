"""A load generator for any OpenAI-compatible streaming server, timed like vLLM's `bench serve`.

Two ways to offer load:
- closed loop: `concurrency` clients each send their next request when the last one ends;
- open loop: requests arrive on their own schedule, gaps drawn from a gamma distribution with
  shape `burstiness` and mean 1/rate (burstiness 1 is a Poisson process), optionally capped at
  `max_concurrency` requests in flight.

Output tokens come from the server's `usage` (asked for with `stream_options.include_usage`);
a stream without usage counts as failed rather than being estimated. Cached prompt tokens come
from the usage too, or llama-server's `timings`. Prompt and reply text never leave this module
except in requests (`workloads` sends a conversation's replies back in its next turn), and
never reach a record, a log or a saved file.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

from freehold.errors import InvalidInput, NotFound
from freehold.measure.serving_stats import RequestRecord, Summary, summarize

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Prompt:
    """One request's input: a completion prompt or chat messages, and how many tokens to ask."""

    output_len: int
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Target:
    """Where and how to send requests."""

    url: str
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True
    # Merged into every request body: fields a server needs that OpenAI's API lacks, e.g. a
    # logit_bias that bans EOS where a server has no ignore_eos.
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def request_url(self) -> str:
        base = self.url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base + ENDPOINTS[self.endpoint]

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


@dataclass
class Level:
    """One load level: its summary and the raw per-request records behind it."""

    summary: Summary
    records: list[RequestRecord] = field(default_factory=list)


OnDone = Callable[[RequestRecord], None]


def check_target(target: Target) -> None:
    parsed = urlparse(target.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidInput(
            f"--url {target.url!r} is not an http(s) URL: e.g. http://127.0.0.1:8080"
        )
    if target.endpoint not in ENDPOINTS:
        raise InvalidInput(
            f"--endpoint must be one of {', '.join(ENDPOINTS)}, not {target.endpoint}"
        )


# ---- prompts --------------------------------------------------------------------------------


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """The distinct words of the packaged corpus, sorted: what synthetic prompts are made of."""
    text = files("freehold.measure").joinpath("data", "corpus.txt").read_text(encoding="utf-8")
    return tuple(sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,}", text)}))


def synthetic_prompts(
    n: int, words: int, output_len: int, seed: int = 0, chat: bool = False
) -> list[Prompt]:
    """`n` distinct prompts of `words` random words each, so no prefix cache can help."""
    if n < 1 or words < 1 or output_len < 1:
        raise InvalidInput("--num-prompts, --input-len and --output-len must be at least 1")
    vocab = vocabulary()
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        text = " ".join(vocab[i] for i in rng.integers(0, len(vocab), size=words))
        if chat:
            prompts.append(Prompt(output_len, messages=[{"role": "user", "content": text}]))
        else:
            prompts.append(Prompt(output_len, text=text))
    return prompts


def load_dataset(path: Path, output_len: int, num_prompts: int | None, chat: bool) -> list[Prompt]:
    """JSONL, one request a line: {"prompt": "..."} or {"messages": [...]}, optionally with
    "output_len" (or "max_tokens")."""
    if not path.is_file():
        raise NotFound(f"dataset {path} not found: give a JSONL file of prompts")
    prompts: list[Prompt] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidInput(f"{path.name} line {n} is not JSON") from None
        if not isinstance(row, dict):
            raise InvalidInput(f"{path.name} line {n}: expected an object")
        out = int(row.get("output_len") or row.get("max_tokens") or output_len)
        text, messages = row.get("prompt"), row.get("messages")
        if isinstance(messages, list) and chat:
            prompts.append(Prompt(out, messages=messages))
        elif isinstance(text, str) and chat:
            prompts.append(Prompt(out, messages=[{"role": "user", "content": text}]))
        elif isinstance(text, str):
            prompts.append(Prompt(out, text=text))
        elif isinstance(messages, list):
            raise InvalidInput(
                f"{path.name} line {n} has chat messages: use --endpoint chat for this dataset"
            )
        else:
            raise InvalidInput(f'{path.name} line {n}: needs a "prompt" string or "messages" list')
        if num_prompts is not None and len(prompts) >= num_prompts:
            break
    if not prompts:
        raise InvalidInput(f"dataset {path} has no prompts")
    return prompts


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int = 0) -> np.ndarray:
    """Send times (s from start) for `n` requests: first at 0, then gamma-distributed gaps."""
    if rate <= 0 or burstiness <= 0:
        raise InvalidInput("--rate and --burstiness must be positive")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])


# ---- one request ----------------------------------------------------------------------------


def _payload(target: Target, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": prompt.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.endpoint == "chat":
        body["messages"] = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
    else:
        if prompt.text is None:
            raise InvalidInput("chat messages need --endpoint chat")
        body["prompt"] = prompt.text
    return {**body, **target.extra_body}


def _is_token_chunk(choice: dict[str, Any], chat: bool) -> bool:
    """A chunk with choices counts, as in vLLM; for chat, not the opening chunk that only
    names the role (OpenAI sends it with `"content": ""`, some servers before any token)."""
    if not chat:
        return True
    delta = choice.get("delta") or {}
    has_content = bool(delta.get("content") or delta.get("reasoning_content"))
    return has_content or bool(delta.get("tool_calls")) or choice.get("finish_reason") is not None


def _reply_text(choice: dict[str, Any], chat: bool) -> str:
    """The visible text a chunk adds: what a chat client shows and sends back next turn."""
    if not chat:
        return str(choice.get("text") or "")
    return str((choice.get("delta") or {}).get("content") or "")


async def send_request(
    client: httpx.AsyncClient,
    target: Target,
    prompt: Prompt,
    index: int,
    t0: float,
    reply: list[str] | None = None,
) -> RequestRecord:
    """Send one streaming request and time its chunks. With `reply`, the streamed text is
    appended to it (for a conversation's next turn); it never goes into the record."""
    rec = RequestRecord(index=index)
    chat = target.endpoint == "chat"
    body = _payload(target, prompt)
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    finish: str | None = None
    first = last = 0.0
    got_token = False
    st = time.perf_counter()
    rec.start = st - t0
    try:
        async with client.stream(
            "POST", target.request_url, json=body, headers=target.headers()
        ) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:200]
                rec.error = f"HTTP {resp.status_code}: {detail}"
                return rec
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (pings), event names
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    rec.error = "the stream carried a chunk that is not a JSON object"
                    return rec
                if isinstance(chunk.get("error"), dict | str):
                    rec.error = f"server error: {str(chunk['error'])[:200]}"
                    return rec
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                if isinstance(chunk.get("timings"), dict):  # llama.cpp's llama-server
                    timings = chunk["timings"]
                choices = chunk.get("choices")
                if choices and isinstance(choices[0], dict):
                    finish = choices[0].get("finish_reason") or finish
                    if reply is not None:
                        reply.append(_reply_text(choices[0], chat))
                if choices and _is_token_chunk(choices[0], chat):
                    if not got_token:
                        got_token, first = True, now
                    else:
                        rec.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return rec
    if not got_token:
        rec.error = "the stream carried no tokens"
        return rec
    rec.ttft, rec.e2e = first - st, last - st
    rec.prompt_tokens, rec.cached_tokens = prompt_counts(usage, timings)
    if usage is not None and isinstance(usage.get("completion_tokens"), int):
        rec.output_tokens = usage["completion_tokens"]
    elif finish == "length":
        # No usage (e.g. llama-cpp-python's server), but stopping for length means exactly
        # max_tokens were generated. The prompt's size stays unknown (0).
        rec.output_tokens = int(body["max_tokens"])
    else:
        rec.error = (
            "no usage in the stream and the request did not stop at max_tokens, so its tokens "
            "cannot be counted: the server must honour stream_options.include_usage"
        )
        return rec
    rec.success = True
    return rec


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def prompt_counts(
    usage: dict[str, Any] | None, timings: dict[str, Any] | None
) -> tuple[int, int | None]:
    """Prompt tokens (0: unknown) and how many of them the server took from its cache (None:
    unknown), from OpenAI's `usage.prompt_tokens_details.cached_tokens` or, failing that,
    llama-server's `timings`: `cache_n` tokens reused and `prompt_n` tokens computed."""
    usage, timings = usage or {}, timings or {}
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
    cache_n, prompt_n = _int(timings.get("cache_n")), _int(timings.get("prompt_n"))
    if cached is None:
        cached = cache_n
    prompt = _int(usage.get("prompt_tokens"))
    if prompt is None and cache_n is not None and prompt_n is not None:
        prompt = cache_n + prompt_n
    return prompt or 0, cached


# ---- load patterns --------------------------------------------------------------------------


async def warm_up(client: httpx.AsyncClient, target: Target) -> None:
    """One tiny untimed request first, so the client's one-off set-up costs (imports, first
    connection) do not land on the first measured request. Its words are not in any prompt."""
    probe = (
        Prompt(1, text="warm up")
        if target.endpoint != "chat"
        else Prompt(1, messages=[{"role": "user", "content": "warm up"}])
    )
    await send_request(client, target, probe, -1, time.perf_counter())


def http_client(target: Target) -> httpx.AsyncClient:
    host = urlparse(target.url).hostname or ""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(target.timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        # Loopback never goes through a proxy, whatever the environment says.
        trust_env=host not in LOOPBACK,
    )


async def closed_loop(
    target: Target, prompts: list[Prompt], concurrency: int, on_done: OnDone | None = None
) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients, each sending its next prompt as soon as the last one finishes."""
    if concurrency < 1:
        raise InvalidInput("--concurrency values must be at least 1")
    queue: asyncio.Queue[tuple[int, Prompt]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    records: list[RequestRecord] = []
    async with http_client(target) as client:
        await warm_up(client, target)
        t0 = time.perf_counter()

        async def worker() -> None:
            while not queue.empty():
                i, prompt = queue.get_nowait()
                rec = await send_request(client, target, prompt, i, t0)
                records.append(rec)
                if on_done:
                    on_done(rec)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        duration = time.perf_counter() - t0
    return sorted(records, key=lambda r: r.index), duration


async def open_loop(
    target: Target,
    prompts: list[Prompt],
    rate: float,
    burstiness: float = 1.0,
    seed: int = 0,
    max_concurrency: int | None = None,
    on_done: OnDone | None = None,
) -> tuple[list[RequestRecord], float]:
    """Requests sent at gamma-distributed arrival times, whatever the server's pace."""
    offsets = arrival_offsets(len(prompts), rate, burstiness, seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records: list[RequestRecord] = []
    async with http_client(target) as client:
        await warm_up(client, target)
        t0 = time.perf_counter()

        async def one(i: int, prompt: Prompt) -> None:
            if gate is not None:
                async with gate:
                    rec = await send_request(client, target, prompt, i, t0)
            else:
                rec = await send_request(client, target, prompt, i, t0)
            records.append(rec)
            if on_done:
                on_done(rec)

        tasks = []
        for i, (offset, prompt) in enumerate(zip(offsets, prompts, strict=True)):
            delay = t0 + float(offset) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, prompt)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return sorted(records, key=lambda r: r.index), duration


async def fit_tokens(
    client: httpx.AsyncClient,
    target: Target,
    make: Callable[[int], Prompt],
    sizes: tuple[int, int],
) -> tuple[float, float]:
    """Fit prompt tokens = offset + slope * k through two probes `make(k)`, counted by the
    server's own usage (chat templates included), so no local tokenizer is needed."""
    counts = []
    for k in sizes:
        rec = await send_request(client, target, make(k), -1, time.perf_counter())
        if not rec.success:
            raise InvalidInput(f"cannot reach a working server at {target.url}: {rec.error}")
        if not rec.prompt_tokens:
            raise InvalidInput(
                f"{target.url} reports no prompt token counts (no streamed usage), so "
                "prompts cannot be sized in tokens: use --no-calibrate (--input-len in words)"
            )
        counts.append(rec.prompt_tokens)
    slope = (counts[1] - counts[0]) / (sizes[1] - sizes[0]) if sizes[1] != sizes[0] else 0.0
    return counts[0] - slope * sizes[0], slope


async def calibrate_words(target: Target, input_len: int, seed: int = 0) -> int:
    """How many random words make `input_len` prompt tokens on this server, from two probes."""
    chat = target.endpoint == "chat"

    def probe(k: int) -> Prompt:
        return synthetic_prompts(1, k, 1, seed=seed + 10_000 + k, chat=chat)[0]

    async with http_client(target) as client:
        offset, slope = await fit_tokens(
            client, target, probe, (max(input_len // 4, 1), max(input_len, 2))
        )
    if slope <= 0:
        return input_len
    return max(1, round((input_len - offset) / slope))


def run_level(
    target: Target,
    prompts: list[Prompt],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
    slo: dict[str, float] | None = None,
    on_done: OnDone | None = None,
) -> Level:
    """Run one load level to completion: closed loop at `concurrency`, or open loop at `rate`."""
    if rate is not None:
        records, duration = asyncio.run(
            open_loop(target, prompts, rate, burstiness, seed, concurrency, on_done)
        )
        label = f"rate {rate:g}/s" + (f", max {concurrency} in flight" if concurrency else "")
    elif concurrency is not None:
        records, duration = asyncio.run(closed_loop(target, prompts, concurrency, on_done))
        label = f"concurrency {concurrency}"
    else:
        raise InvalidInput("give --concurrency or --rate")
    summary = summarize(records, duration, label=label, concurrency=concurrency, rate=rate, slo=slo)
    return Level(summary, records)


def parse_extra_body(text: str | None) -> dict[str, Any]:
    """`--extra-body '{"logit_bias": {"2": -100}}'`: a JSON object for every request body."""
    if not text:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"--extra-body is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise InvalidInput("--extra-body must be a JSON object, e.g. '{\"top_k\": 1}'")
    return extra


def parse_int_list(text: str, what: str) -> list[int]:
    """`1,2,4,8` into [1, 2, 4, 8]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"{what} takes comma-separated whole numbers, e.g. 1,2,4,8") from None
    if not values or any(v < 1 for v in values):
        raise InvalidInput(f"{what} values must be at least 1")
    return values


def throughput_for_cost(levels: list[Level]) -> tuple[float | None, float, dict[str, Any]]:
    """Prefill and decode rates to keep for `freehold cost`, and how they were derived.

    Decode: the best output tok/s of any level (the machine's capacity under this load).
    Prefill: prompt tokens / TTFT at the lightest load, where queueing adds least to TTFT.
    """
    ok = [lv for lv in levels if lv.summary.completed]
    if not ok:
        raise InvalidInput("no request succeeded, so there is no throughput to record")
    best = max(ok, key=lambda lv: lv.summary.output_throughput)
    light = min(ok, key=lambda lv: (lv.summary.concurrency or math.inf, lv.summary.rate or 0.0))
    good = [r for r in light.records if r.success and r.ttft]
    ttft_total = sum(r.ttft or 0.0 for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in good)
    # Servers that report no usage leave prompt sizes unknown: then there is no prefill rate.
    prefill = prompt_tokens / ttft_total if ttft_total > 0 and prompt_tokens else None
    detail = {
        "decode_from": best.summary.label,
        "prefill_from": light.summary.label + " (prompt tokens / TTFT, includes HTTP overhead)",
    }
    return prefill, best.summary.output_throughput, detail
