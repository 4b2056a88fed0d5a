"""`freehold serve` as a real process: starter import on an empty vault, no connection beyond
loopback (an audit hook records every socket connect/sendto/getaddrinfo), SIGTERM drains."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_harness import free_port, wait_ready

# Runs the real CLI with an audit hook that logs every socket destination to $GUARD_LOG.
GUARD = r"""
import json, os, sys
_log = open(os.environ["GUARD_LOG"], "a", buffering=1)
def _hook(event, args):
    if event in ("socket.connect", "socket.sendto"):
        _log.write(json.dumps([event, repr(args[1])]) + "\n")
    elif event == "socket.getaddrinfo":
        _log.write(json.dumps([event, repr(args[0])]) + "\n")
sys.addaudithook(_hook)
if sys.argv[1:2] == ["--exec"]:
    exec(sys.argv[2])
else:
    from freehold.cli import main
    main(sys.argv[1:])
"""


def _guarded(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen([sys.executable, "-c", GUARD, *args], env=env, **kw)


def _run_guarded(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", GUARD, *args], env=env, capture_output=True, text=True, timeout=60
    )


def _is_loopback(dest: str) -> bool:
    """`dest` is the repr of a socket address: ('127.0.0.1', 8642), '/unix/path', 'localhost'."""
    try:
        value = eval(dest, {})  # noqa: S307 - reprs we wrote ourselves
    except Exception:
        return False
    host = value[0] if isinstance(value, tuple) else value
    if isinstance(host, bytes):
        host = host.decode()
    if host is None or (isinstance(host, str) and (host.startswith("/") or host == "localhost")):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.endswith("_PROXY")}
    e.update(FREEHOLD_HOME=str(tmp_path / "home"), GUARD_LOG=str(tmp_path / "guard.log"))
    return e


def test_serve_imports_starter_stays_local_and_drains_on_sigterm(
    env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _guarded(
        ["serve", "--port", str(port), "--slots", "2", "--threads", "2", "--ctx", "1024"],
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(base, timeout=180)
        models = httpx.get(base + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["smollm2"]  # the starter, imported into the vault
        r = httpx.post(
            base + "/v1/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            },
            timeout=60,
        )
        assert r.status_code == 200
        body = {
            "model": "smollm2",
            "prompt": "Once upon a time",
            "max_tokens": 48,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as s:
            lines = s.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still finish
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 48
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "curl http://127.0.0.1" in out and "from openai import OpenAI" in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health", timeout=5)

    # The other CLI commands of this issue, under the same guard.
    for args in (["keys", "create", "--name", "k"], ["keys", "list"], ["usage", "--by", "model"]):
        done = _run_guarded(args, env)
        assert done.returncode == 0, done.stderr
    usage = _run_guarded(["usage", "--json"], env)
    assert sum(row["requests"] for row in json.loads(usage.stdout)) == 2

    events = [json.loads(line) for line in Path(env["GUARD_LOG"]).read_text().splitlines()]
    outside = [e for e in events if not _is_loopback(e[1])]
    assert outside == []


def test_the_guard_sees_outbound_connections(env: dict[str, str]) -> None:
    """The detector itself: a connect to a non-loopback address (TEST-NET, never routed)."""
    code = (
        "import socket\n"
        "s = socket.socket(); s.settimeout(0.05)\n"
        "try: s.connect(('192.0.2.1', 9))\n"
        "except OSError: pass\n"
        "socket.socket().connect_ex(('127.0.0.1', 9))\n"
    )
    done = _run_guarded(["--exec", code], env)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in Path(env["GUARD_LOG"]).read_text().splitlines()]
    dests = [e[1] for e in events if e[0] == "socket.connect"]
    assert [_is_loopback(d) for d in dests] == [False, True]


def test_the_banner_comes_when_its_curl_line_works(env: dict[str, str]) -> None:
    """The curl line printed at start, run the moment it appears, gets an answer, not a 503."""
    port = free_port()
    proc = _guarded(
        ["serve", "--port", str(port), "--slots", "1", "--threads", "2", "--ctx", "512"],
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:
            seen.append(line)
            if line.strip().startswith("curl "):
                command = line.rstrip().removesuffix("\\") + next(proc.stdout)
                break
        else:
            raise AssertionError("no curl line in:\n" + "".join(seen))
        assert any(line.startswith("Loading ") for line in seen)
        done = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env
        )
        reply = json.loads(done.stdout)
        assert reply["choices"][0]["message"]["content"], reply
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
