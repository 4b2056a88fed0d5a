"""`make bench`: run every benchmark (or those named on the command line) and print results.

Each benchmark is a module here with a `main()` that measures side by side in one run and
prints a Markdown table ready for BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def _benchmarks() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv: list[str]) -> None:
    names = argv or _benchmarks()
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"\n## {name}\n", flush=True)
        module.main()


if __name__ == "__main__":
    main(sys.argv[1:])
