"""Every front door goes through the one admission and accounting path: the same key rules (a
key limited to one model is refused another, in the door's own error shape), one ledger row
with the door's endpoint, an audit line without the prompt's text, and metrics."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import Running, running_server

from freehold.config import paths
from freehold.server.auth import KeyStore

SECRET_WORD = "periwinkle-zebra-4417"  # in every prompt; must never reach the audit log
HI = [{"role": "user", "content": f"Say {SECRET_WORD}."}]


def _openai_refusal(body: dict[str, Any]) -> bool:
    return body["error"]["type"] == "permission_error"


def _anthropic_refusal(body: dict[str, Any]) -> bool:
    return body["type"] == "error" and body["error"]["type"] == "permission_error"


def _ollama_refusal(body: dict[str, Any]) -> bool:
    return set(body) == {"error"} and isinstance(body["error"], str)


# door: (path, body for a model, ledger endpoint, is this body that door's 403 shape)
DOORS: dict[str, tuple[str, Callable[[str], dict[str, Any]], str, Callable[..., bool]]] = {
    "chat": (
        "/v1/chat/completions",
        lambda m: {"model": m, "messages": HI, "max_tokens": 4},
        "chat",
        _openai_refusal,
    ),
    "completions": (
        "/v1/completions",
        lambda m: {"model": m, "prompt": SECRET_WORD, "max_tokens": 4},
        "completions",
        _openai_refusal,
    ),
    "responses": (
        "/v1/responses",
        lambda m: {"model": m, "input": HI[0]["content"], "max_output_tokens": 4},
        "responses",
        _openai_refusal,
    ),
    "messages": (
        "/v1/messages?beta=true",
        lambda m: {"model": m, "messages": HI, "max_tokens": 4},
        "messages",
        _anthropic_refusal,
    ),
    "ollama.chat": (
        "/api/chat",
        lambda m: {"model": m, "messages": HI, "stream": False, "options": {"num_predict": 4}},
        "ollama.chat",
        _ollama_refusal,
    ),
    "ollama.generate": (
        "/api/generate",
        lambda m: {
            "model": m,
            "prompt": SECRET_WORD,
            "stream": False,
            "options": {"num_predict": 4},
        },
        "ollama.generate",
        _ollama_refusal,
    ),
}


@pytest.fixture(scope="module")
def setup(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Running, str]:
    home = tmp_path_factory.mktemp("doors-home")
    with KeyStore(paths(home).keys) as store:
        secret = store.create("only-a", models=["a"])[1]
    auth = {"Authorization": f"Bearer {secret}"}
    with running_server(
        home, {"a": smollm2_path, "b": smollm2_path}, ready_headers=auth, slots=2
    ) as s:
        yield s, secret


@pytest.mark.parametrize("door", DOORS)
def test_each_door_admits_refuses_and_accounts_alike(setup: tuple[Running, str], door: str) -> None:
    server, secret = setup
    path, body, endpoint, is_refusal = DOORS[door]
    auth = {"Authorization": f"Bearer {secret}"}
    refused = httpx.post(server.base + path, json=body("b"), headers=auth, timeout=120)
    assert refused.status_code == 403 and is_refusal(refused.json()), refused.text
    ok = httpx.post(server.base + path, json=body("a"), headers=auth, timeout=120)
    assert ok.status_code == 200, ok.text

    server.services.ledger.flush()
    server.services.audit.flush()
    with sqlite3.connect(server.home / "ledger.db") as db:
        rows = db.execute(
            "SELECT model, status, completion_tokens FROM requests WHERE endpoint = ?",
            (endpoint,),
        ).fetchall()
    assert ("b", 403, 0) in rows
    assert any(m == "a" and status == 200 and n > 0 for m, status, n in rows)

    audit = (server.home / "audit.jsonl").read_text()
    lines = [json.loads(x) for x in audit.splitlines()]
    assert {(e["endpoint"], e["status"]) for e in lines} >= {(endpoint, 403), (endpoint, 200)}
    assert SECRET_WORD not in audit

    metrics = httpx.get(server.base + "/metrics", headers=auth, timeout=30).text
    counted = {
        (s.labels["model"], s.labels["endpoint"], s.labels["status"])
        for family in text_string_to_metric_families(metrics)
        if family.name == "freehold_requests"
        for s in family.samples
        if s.name == "freehold_requests_total" and s.value > 0
    }
    assert {("a", endpoint, "200"), ("b", endpoint, "403")} <= counted
