"""Install (from npm, once, outside the repo) and run the real Claude Code and Codex CLIs offline.

Each run gets a clean environment and a throwaway home, talks only to the given 127.0.0.1 server,
and has retries and every outbound extra (telemetry, update checks, plugin sync) turned off.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Pinned so a test sees the same requests every run (npm's latest on 2026-11-30).
CLAUDE_CODE_VERSION = "2.1.332"
CODEX_VERSION = "0.171.0"

# uname -m -> (npm platform-package arch, Rust target arch)
_ARCHES = {
    "x86_64": ("x64", "x86_64"),
    "aarch64": ("arm64", "aarch64"),
    "arm64": ("arm64", "aarch64"),
}


def agents_dir() -> Path:
    if d := os.environ.get("FREEHOLD_AGENTS_DIR"):
        return Path(d)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "freehold-tests" / "agents"


def _arch() -> tuple[str, str]:
    machine = platform.machine()
    if machine not in _ARCHES or platform.system() != "Linux":
        raise RuntimeError(f"no agent CLI build known for {platform.system()} {machine}")
    return _ARCHES[machine]


def _install(name: str, spec: str, binary_rel: str) -> Path:
    prefix = agents_dir() / name
    binary, marker = prefix / binary_rel, prefix / ".installed"
    if marker.exists() and binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed to install {spec} (apt-get install npm)")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Two pytest processes (xdist, parallel sessions) must not unpack into the same prefix.
    with open(prefix.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and binary.exists():
            return binary
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir()
        # The native binary is in the platform package (an optional dependency); the
        # postinstall script only hard-links it into bin/, so scripts are not needed.
        cmd = [npm, "install", "--prefix", str(prefix), "--no-save", "--no-audit", "--no-fund"]
        cmd += ["--ignore-scripts", "--include=optional", "--no-update-notifier", spec]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0 or not binary.exists():
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}, {binary} "
                f"{'exists' if binary.exists() else 'missing'}):\n{proc.stdout}\n{proc.stderr}"
            )
        marker.write_text(spec + "\n")
    return binary


def claude_binary() -> Path:
    npm_arch, _ = _arch()
    return _install(
        f"claude-code-{CLAUDE_CODE_VERSION}",
        f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}",
        f"node_modules/@anthropic-ai/claude-code-linux-{npm_arch}/claude",
    )


def codex_binary() -> Path:
    npm_arch, rust_arch = _arch()
    return _install(
        f"codex-{CODEX_VERSION}",
        f"@openai/codex@{CODEX_VERSION}",
        f"node_modules/@openai/codex-linux-{npm_arch}/vendor/{rust_arch}-unknown-linux-musl/bin/codex",
    )


def _clean_env(home: Path) -> dict[str, str]:
    # Not os.environ: a developer's own agent session exports ANTHROPIC_*/OPENAI_*/CLAUDECODE
    # variables that would redirect or change these runs.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    env |= {"TERM": "dumb", "NO_COLOR": "1"}
    if tmp := os.environ.get("TMPDIR"):
        env["TMPDIR"] = tmp
    return env


def _run(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    # stdin must be closed: with an open pipe Codex waits for EOF, Claude Code for 3 s.
    # Own session so a timeout kills the CLI's helpers (sandbox, tool shells) too.
    with subprocess.Popen(
        args,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(args, timeout, out, err) from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _workdir(home: Path) -> Path:
    # Outside the repo, so neither CLI picks up its CLAUDE.md/AGENTS.md or git state.
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    return work


def run_claude(
    base_url: str,
    prompt: str,
    *,
    model: str,
    api_key: str = "test-key",
    bare: bool = True,
    timeout: float = 120.0,
    home: Path,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`claude -p` against base_url (http://127.0.0.1:PORT, no /v1).

    bare: no built-in tools and a one-line system prompt (an ~850-byte request); otherwise
    Claude Code's defaults (12 tools, a ~49 KB request). The answer, or "API Error: ..."
    with exit 1, is on stdout. A generic 400 is re-sent at once, built in, with betas and
    fields dropped: 3 requests bare, 6 with tools.
    """
    env = _clean_env(home) | {
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": api_key,
        # Without it: DNS look-ups for telemetry/flags and a HEAD /api/hello preflight.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        # Default is 10 retries with backoff: about 3 minutes against a server answering 5xx.
        "CLAUDE_CODE_MAX_RETRIES": "0",
        # Else an error mid-stream is retried once as a non-streaming request.
        "CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK": "1",
    }
    args = [str(claude_binary()), "-p", "--model", model, "--no-session-persistence"]
    if bare:
        args += ["--bare", "--tools", "", "--system-prompt", "You are a helpful assistant."]
    # "--" ends the variadic --tools list, so the prompt is not taken as a tool name.
    args += [*extra_args, "--", prompt]
    return _run(args, env, _workdir(home), timeout)


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string of plain text is a valid TOML basic string


def run_codex(
    base_url_v1: str,
    prompt: str,
    *,
    model: str,
    api_key: str = "test-key",
    timeout: float = 120.0,
    home: Path,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`codex exec` against base_url_v1 (http://127.0.0.1:PORT/v1) over the Responses API.

    stdout holds only the final answer; the transcript and "ERROR: ..." lines (exit 1) go
    to stderr.
    """
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(
        f"""model = {_toml(model)}
model_provider = "freehold"
# Each of these otherwise reaches api.github.com or (ab.)chatgpt.com.
check_for_update_on_startup = false

[analytics]
enabled = false

[otel]
exporter = "none"

[features]
apps = false
plugins = false
remote_plugin = false
# On: a refused connection is retried forever ("Reconnecting... waiting for network").
unbounded_connection_retries = false

[model_providers.freehold]
name = "freehold"
base_url = {_toml(base_url_v1)}
wire_api = "responses"
env_key = "FREEHOLD_API_KEY"
# Defaults (4 and 5) make 30 requests over ~30 s against a server answering 5xx.
request_max_retries = 0
stream_max_retries = 0
"""
    )
    env = _clean_env(home) | {"CODEX_HOME": str(codex_home), "FREEHOLD_API_KEY": api_key}
    work = _workdir(home)
    args = [str(codex_binary()), "exec", "--skip-git-repo-check", "--strict-config"]
    args += ["--ephemeral", "--color", "never", "-C", str(work), *extra_args, "--", prompt]
    return _run(args, env, work, timeout)
