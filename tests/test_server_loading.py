"""A request for a model that is still loading waits for it, up to --load-wait; then 503."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from server_harness import running_server

BODY = {"model": "gemma", "prompt": "The capital of France is", "max_tokens": 2}


def test_first_request_waits_for_its_model_to_load(
    smollm2_path: Path, gemma_path: Path, tmp_path: Path
) -> None:
    models = {"smollm2": smollm2_path, "gemma": gemma_path}
    with running_server(tmp_path, models, eager=["smollm2"]) as s:
        assert httpx.get(s.base + "/ready").json()["models"]["gemma"] == "on demand"
        started = time.perf_counter()
        r = httpx.post(s.v1 + "/completions", json=BODY, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"]
        assert time.perf_counter() - started > 0.2  # it did wait for a load


def test_past_load_wait_it_is_503_with_retry_after(
    smollm2_path: Path, gemma_path: Path, tmp_path: Path
) -> None:
    models = {"smollm2": smollm2_path, "gemma": gemma_path}
    with running_server(tmp_path, models, eager=["smollm2"], load_wait_s=0.0) as s:
        r = httpx.post(s.v1 + "/completions", json=BODY, timeout=60)
        assert r.status_code == 503
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "model_loading"
        assert "--load-wait" in r.json()["error"]["message"]
        deadline = time.monotonic() + 120
        while httpx.get(s.base + "/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # the refused request still started the load
        assert httpx.post(s.v1 + "/completions", json=BODY, timeout=60).status_code == 200
