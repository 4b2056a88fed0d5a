"""The real coding agents against Freehold: Claude Code over `/v1/messages`, Codex CLI over
`/v1/responses`, both installed from npm into a cache outside the repo and run offline.

What each sends is large (Claude Code ~22k tokens with its tools on, Codex ~6.5k): SmolLM2's
8192-token context holds Codex's request and Claude Code's with its tools off; where a prompt
does not fit, the tool must show Freehold's context-length error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_clis import run_claude, run_codex
from server_harness import Running, running_server

from freehold.config import paths
from freehold.server.auth import KeyStore

MODEL = "smollm2"


@pytest.fixture(scope="module")
def agents_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agents-home")


@pytest.fixture(scope="module")
def key(agents_home: Path) -> str:
    with KeyStore(paths(agents_home).keys) as store:
        return store.create("agent")[1]


@pytest.fixture(scope="module")
def server(smollm2_path: Path, agents_home: Path, key: str) -> Running:
    with running_server(
        agents_home,
        {MODEL: smollm2_path},
        ready_headers={"Authorization": f"Bearer {key}"},
        slots=1,
        ctx=8192,
        # Codex sets no output limit and no temperature, and counts a reply cut at the limit as a
        # failure: room enough that SmolLM2's sampled greeting ends by itself.
        max_tokens=1024,
        aliases={"claude-sonnet-4-5": MODEL},
    ) as s:
        yield s


def _ledger_endpoints(server: Running) -> list[tuple[str, int]]:
    import sqlite3

    server.services.ledger.flush()
    with sqlite3.connect(server.home / "ledger.db") as db:
        return db.execute("SELECT endpoint, status FROM requests ORDER BY rowid").fetchall()


def test_claude_code_gets_an_answer(server: Running, key: str, tmp_path: Path) -> None:
    # Claude Code names Anthropic's models; `--alias` maps the name onto the served model.
    r = run_claude(
        server.base,
        "Say hello in one short sentence.",
        model="claude-sonnet-4-5",
        api_key=key,
        bare=True,
        home=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() and "API Error" not in r.stdout
    assert ("messages", 200) in _ledger_endpoints(server)


def test_claude_code_with_its_tools_shows_the_context_error(
    server: Running, key: str, tmp_path: Path
) -> None:
    # With its built-in tools on, Claude Code sends ~22k tokens: more than SmolLM2's 8192.
    r = run_claude(
        server.base,
        "Say hello.",
        model=MODEL,
        api_key=key,
        bare=False,
        home=tmp_path,
        timeout=300,
    )
    assert r.returncode != 0
    assert "too long" in r.stdout.lower(), r.stdout + r.stderr


def test_claude_code_with_a_bad_key_is_refused(server: Running, tmp_path: Path) -> None:
    r = run_claude(server.base, "Hi", model=MODEL, api_key="fh-wrong", home=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "API key" in r.stdout or "401" in r.stdout, r.stdout + r.stderr


def test_codex_gets_an_answer(server: Running, key: str, tmp_path: Path) -> None:
    r = run_codex(
        server.v1,
        "Say hello.",
        model=MODEL,
        api_key=key,
        home=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), r.stderr[-3000:]
    assert ("responses", 200) in _ledger_endpoints(server)


def test_codex_shows_the_context_error(smollm2_path: Path, tmp_path: Path) -> None:
    # Codex's ~6.5k-token request does not fit a 4096-token context.
    home = tmp_path / "home"
    with running_server(home, {MODEL: smollm2_path}, slots=1, ctx=4096) as small:
        r = run_codex(small.v1, "Say hello.", model=MODEL, home=tmp_path / "codex", timeout=300)
        rows = _ledger_endpoints(small)
    assert r.returncode != 0
    assert "context window" in r.stderr, r.stderr[-3000:]
    assert ("responses", 400) in rows
    assert not json.dumps(rows).count("200")
