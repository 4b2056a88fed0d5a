"""Summary statistics from per-request records, hand-checked against vLLM's definitions."""

from __future__ import annotations

import math

import pytest

from freehold.errors import InvalidInput
from freehold.measure.serving_stats import RequestRecord, meets_slo, parse_slo, summarize


def rec(i: int, ttft: float, e2e: float, out: int, itl: list[float], prompt: int = 10):
    return RequestRecord(i, 0.0, True, ttft, e2e, itl, prompt, out)


def test_tpot_itl_e2e_and_throughput() -> None:
    records = [
        rec(0, 0.1, 0.5, 5, [0.1, 0.1, 0.1, 0.1]),  # TPOT (0.5 - 0.1) / 4 = 0.1
        rec(1, 0.2, 0.8, 4, [0.3, 0.2, 0.1]),  # TPOT 0.6 / 3 = 0.2
        rec(2, 0.3, 0.3, 1, []),  # one token: no TPOT, no ITL
        RequestRecord(3, error="HTTP 500"),
    ]
    s = summarize(records, duration_s=2.0, label="c1", concurrency=1)
    assert (s.completed, s.failed, s.first_error) == (3, 1, "HTTP 500")
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_throughput == pytest.approx(10 / 2.0)
    assert s.total_token_throughput == pytest.approx(40 / 2.0)
    assert s.ttft.mean == pytest.approx(200.0) and s.ttft.median == pytest.approx(200.0)
    assert s.tpot.count == 2 and s.tpot.mean == pytest.approx(150.0)
    assert s.itl.count == 7  # pooled over requests
    assert s.itl.mean == pytest.approx(1000 * 1.0 / 7)
    assert s.itl.median == pytest.approx(100.0)
    # Sorted E2E [0.3, 0.5, 0.8]: p99 sits at rank 0.99 x 2 = 1.98, linearly interpolated.
    assert s.e2e.p99 == pytest.approx(1000 * (0.5 + 0.98 * (0.8 - 0.5)))
    assert s.goodput is None


def test_goodput_needs_every_slo() -> None:
    records = [
        rec(0, 0.1, 0.5, 5, [0.1] * 4),
        rec(1, 0.6, 1.0, 5, [0.1] * 4),  # TTFT too slow
        rec(2, 0.1, 2.1, 5, [0.5] * 4),  # TPOT 0.5 s too slow
        rec(3, 0.1, 0.1, 1, []),  # single token: TPOT does not apply
    ]
    slo = parse_slo("ttft=500,tpot=200")
    assert slo == {"ttft": 500.0, "tpot": 200.0}
    assert [meets_slo(r, slo) for r in records] == [True, False, False, True]
    assert summarize(records, 4.0, slo=slo).goodput == pytest.approx(0.5)
    assert summarize(records, 4.0, slo={"e2e": 1000}).goodput == pytest.approx(0.75)


def test_empty_and_bad_inputs() -> None:
    s = summarize([RequestRecord(0, error="boom")], 1.0)
    assert s.completed == 0 and math.isnan(s.ttft.mean) and s.ttft.count == 0
    assert parse_slo(None) is None
    for bad in ("ttft", "latency=3", "ttft=abc", "tpot=-1"):
        with pytest.raises(InvalidInput):
            parse_slo(bad)


def test_raw_json_is_milliseconds_without_text() -> None:
    j = rec(7, 0.25, 0.65, 5, [0.1] * 4).to_json()
    assert j["ttft_ms"] == 250.0 and j["e2e_ms"] == 650.0 and j["tpot_ms"] == 100.0
    assert j["itl_ms"] == [100.0] * 4 and j["index"] == 7
    assert set(j) == {
        "index",
        "start_ms",
        "success",
        "ttft_ms",
        "tpot_ms",
        "e2e_ms",
        "itl_ms",
        "prompt_tokens",
        "output_tokens",
        "cached_tokens",
        "user",
        "turn",
        "error",
    }
