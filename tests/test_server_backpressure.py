"""Bounded admission (slots + queue, then 429) and cancellation when a client goes away."""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from server_harness import Running, running_server

MODEL = "smollm2"
SLOTS, QUEUE = 2, 2


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Running:
    home = tmp_path_factory.mktemp("bp-home")
    with running_server(home, {MODEL: smollm2_path}, slots=SLOTS, max_queue=QUEUE) as s:
        yield s


def _body(max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": MODEL,
        "prompt": "Tell me a long story about a lighthouse.",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def _gauge(server: Running, name: str) -> float:
    text = httpx.get(server.base + "/metrics", timeout=10).text
    m = re.search(rf'^{name}{{model="{MODEL}"}} ([0-9.]+)$', text, re.M)
    assert m, name
    return float(m.group(1))


def _wait_for(cond, timeout: float = 15.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_request_beyond_slots_plus_queue_gets_429(server: Running) -> None:
    url = server.v1 + "/completions"
    with httpx.Client(timeout=120) as client, ExitStack() as stack:
        # Admission answers at once (headers) even for requests that wait in the queue.
        streams = [
            stack.enter_context(client.stream("POST", url, json=_body(48)))
            for _ in range(SLOTS + QUEUE)
        ]
        assert [r.status_code for r in streams] == [200] * (SLOTS + QUEUE)
        _wait_for(lambda: _gauge(server, "freehold_requests_running") == SLOTS)
        assert _gauge(server, "freehold_requests_waiting") == QUEUE
        refused = httpx.post(url, json=_body(4, stream=False), timeout=30)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        err = refused.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        bodies = [r.read().decode() for r in streams]
    for body in bodies:
        assert body.endswith("data: [DONE]\n\n")
        assert body.count('"finish_reason":"length"') == 1
    # Capacity is back: a new request is admitted.
    ok = httpx.post(url, json=_body(2, stream=False), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def _generated(server: Running) -> int:
    (st,) = server.services.registry.stats()
    return st.tokens_generated


def test_disconnected_stream_is_cancelled(server: Running) -> None:
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.v1 + "/completions", json=_body(2000)) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens arrive, then we hang up
            assert any(line.startswith("data: ") for line in got)
    _wait_for(lambda: _gauge(server, "freehold_requests_running") == 0, timeout=10)
    before = _generated(server)
    time.sleep(0.5)
    assert _generated(server) == before  # nothing is generating for nobody
    assert server.services.registry.inflight() == 0


def test_disconnected_blocking_request_is_cancelled(server: Running) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json=_body(2000, stream=False), timeout=1.5)
    _wait_for(lambda: _gauge(server, "freehold_requests_running") == 0, timeout=10)
    _wait_for(lambda: server.services.registry.inflight() == 0, timeout=10)
    server.services.ledger.flush()
    import sqlite3

    with sqlite3.connect(server.home / "ledger.db") as db:
        statuses = [r[0] for r in db.execute("SELECT status FROM requests")]
    assert 499 in statuses  # recorded as "client closed request"
