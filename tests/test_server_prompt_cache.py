"""Multi-turn chat through the server with the official `openai` SDK: history stays cached, the
usage says so, and /metrics shows the cache."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from server_harness import running_server

from freehold.config import parse_size
from freehold.errors import InvalidInput

MODEL = "smollm2"
WORDS = files("freehold.measure").joinpath("data", "corpus.txt").read_text().split()
USERS, TURNS = 8, 3


def _text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _conversation(client: OpenAI, system: str, user: int) -> list[tuple[int, int]]:
    """(prompt tokens, cached tokens) of each turn, re-sending the replies as a chat UI does."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    turns = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": _text(1000 + 10 * user + turn, 12)})
        r = client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        usage = r.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        turns.append((usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0))
        messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})
    return turns


def test_concurrent_conversations_keep_their_history_cached(
    smollm2_path: Path, tmp_path: Path
) -> None:
    system = _text(0, 450)
    with running_server(tmp_path, {MODEL: smollm2_path}, slots=USERS, ctx=1536) as s:
        client = OpenAI(base_url=s.v1, api_key="none", max_retries=0, timeout=300)
        with ThreadPoolExecutor(USERS) as pool:
            runs = list(pool.map(lambda u: _conversation(client, system, u), range(USERS)))
        metrics = httpx.get(s.base + "/metrics").text
    later = [t for run in runs for t in run[1:]]
    share = sum(c for _, c in later) / sum(p for p, _ in later)
    assert share >= 0.95, f"cached share from turn 2 on: {share:.3f} ({later})"

    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    (gauge,) = families["freehold_prompt_cache_share"].samples
    assert gauge.labels == {"model": MODEL} and 0.5 < gauge.value < 1.0
    budget = families["freehold_prompt_cache_budget_bytes"].samples[0].value
    assert 0 < families["freehold_prompt_cache_bytes"].samples[0].value <= budget
    assert "freehold_prompt_cache_hits_total" in metrics
    assert "freehold_prompt_cache_evictions_total" in metrics


@pytest.mark.parametrize("text", ["", "lots", "1.2.3G", "-1G", "5X"])
def test_a_bad_cache_size_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="not a size"):
        parse_size(text)


def test_serve_refuses_a_bad_cache_ram(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("serve", "--cache-ram", "plenty")
    assert result.code != 0
    assert "'plenty' is not a size" in result.err and "Traceback" not in result.err + result.out
