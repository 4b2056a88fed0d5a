"""llama.cpp's own safetensors → GGUF converter, from the sdist of the installed llama-cpp-python.

Nothing of llama.cpp is copied into Freehold. The first conversion fetches the sdist of the
pinned llama-cpp-python from the package index pip uses (`pip download`), keeps only the
converter from its vendored llama.cpp (convert_hf_to_gguf.py, its `conversion` package, its
own gguf-py and chat templates) in a cache outside any repo, and runs it with this Python as
a subprocess. The converter brings its gguf-py onto its path itself, so it always reads and
writes with the gguf code of its own release.
Files in, files out: the vault side is `freehold.adapt.convert`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from freehold.errors import FreeholdError, InvalidInput

ProgressFactory = Callable[[str, int], Callable[[int], None]]
Say = Callable[[str], None]

OUTTYPES = ("f16", "bf16")
SCRIPT = "convert_hf_to_gguf.py"
# What the converter needs of the sdist's vendor/llama.cpp; the rest (sources, tests) stays out.
_KEEP = (SCRIPT, "conversion/", "gguf-py/", "models/templates/", "LICENSE")
_NEEDS = ("torch", "transformers", "safetensors", "numpy")
_ERROR_LINE = re.compile(r"^ERROR:[\w.-]+:(?P<msg>.+)$")
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b:?.*$")


class ConvertError(FreeholdError):
    """The converter refused the folder; the message carries its own reason."""

    exit_code = 2


@dataclass(frozen=True)
class Converter:
    script: Path
    version: str  # llama-cpp-python's
    sdist_sha256: str | None

    @property
    def tool(self) -> str:
        return f"llama.cpp {SCRIPT} (llama-cpp-python {self.version})"


def llama_cpp_version() -> str:
    return metadata.version("llama-cpp-python")


def cache_root() -> Path:
    """`$FREEHOLD_CACHE`, else `$XDG_CACHE_HOME/freehold`, else `~/.cache/freehold`."""
    if env := os.environ.get("FREEHOLD_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "freehold"


def converter_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama-cpp-python-{version or llama_cpp_version()}"


def check_outtype(outtype: str) -> str:
    if outtype.lower() not in OUTTYPES:
        raise InvalidInput(f"--outtype must be one of {', '.join(OUTTYPES)}, not '{outtype}'")
    return outtype.lower()


def check_dependencies() -> None:
    missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise InvalidInput(
            f"converting safetensors needs {', '.join(missing)}, which are not installed: "
            "pip install 'freehold[tune]'"
        )


# -- fetching it once --------------------------------------------------------------------------


def _loaded(where: Path, version: str) -> Converter | None:
    script = where / SCRIPT
    if not script.is_file():
        return None
    try:
        source = json.loads((where / "SOURCE.json").read_text())
    except (OSError, ValueError):
        source = {}
    return Converter(script, version, source.get("sdist_sha256"))


def ensure_converter(say: Say, progress: ProgressFactory) -> Converter:
    """The cached converter for the installed llama-cpp-python, fetched the first time."""
    version = llama_cpp_version()
    final = converter_dir(version)
    if found := _loaded(final, version):
        return found
    final.parent.mkdir(parents=True, exist_ok=True)
    with _fetch_lock(final):
        if found := _loaded(final, version):  # another process fetched it meanwhile
            return found
        say(
            f"llama.cpp's converter is not cached yet: fetching the llama-cpp-python {version} "
            f"source from {_index_host()} (once; kept in {final})"
        )
        work = Path(tempfile.mkdtemp(prefix=f".fetch-{final.name}-", dir=final.parent))
        try:
            sdist = _download(version, work, progress)
            sha = _extract(sdist, work / "converter", progress)
            (work / "converter" / "SOURCE.json").write_text(
                json.dumps({"sdist": sdist.name, "sdist_sha256": sha, "version": version})
            )
            os.rename(work / "converter", final)  # whole or absent, never half
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Converter(final / SCRIPT, version, sha)


@contextmanager
def _fetch_lock(final: Path) -> Iterator[None]:
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def _index_host() -> str:
    """Where pip will download from, as pip's own configuration says."""
    url = os.environ.get("PIP_INDEX_URL")
    if os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes", "on"):
        url = os.environ.get("PIP_FIND_LINKS", "pip's --find-links")
    if not url:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
        )
        m = re.search(r"^(?:global|download)\.index-url='([^']+)'", done.stdout, re.M)
        url = m.group(1) if m else "https://pypi.org/simple"
    return re.sub(r"//[^/@]*@", "//", url)  # never print credentials in an index URL


def _download(version: str, work: Path, progress: ProgressFactory) -> Path:
    """pip download of the sdist, with the bytes pip has written so far as progress."""
    env = {**os.environ, "TMPDIR": str(work)}  # pip's partial download lands where we watch
    # pip prepares the sdist's metadata, so its build requirements come too (as wheels).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python"]
    cmd += ["--progress-bar", "off", "-d", str(work / "sdist"), f"llama-cpp-python=={version}"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    advance = progress(f"Fetching llama-cpp-python {version} source", 0)
    lines = _watch(proc, lambda: _tree_size(work), advance)
    found = sorted((work / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["pip failed"]
        raise ConvertError(
            f"could not fetch llama-cpp-python {version}'s source for its converter: "
            f"{errors[-1].strip()}; check access to the package index (PIP_INDEX_URL) and try "
            "again"
        )
    return found[0]


def _watch(
    proc: subprocess.Popen[str], written: Callable[[], int], advance: Callable[[int], None]
) -> list[str]:
    """Wait for `proc`, advancing the bar by the bytes `written` says it has made so far;
    return its last lines of output."""
    tail: deque[str] = deque(maxlen=200)
    reader = threading.Thread(target=lambda: tail.extend(proc.stdout or ()), daemon=True)
    reader.start()
    seen = 0
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            size = written()
            if size > seen:
                advance(size - seen)
                seen = size
    finally:
        if proc.poll() is None:  # interrupted: leave no child process behind
            proc.kill()
        proc.wait()
    reader.join()
    return [line.rstrip("\n") for line in tail]


def _tree_size(root: Path) -> int:
    """Bytes in the files under `root` now (pip creates and removes them as it goes)."""
    total = 0
    for parent, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _extract(sdist: Path, dest: Path, progress: ProgressFactory) -> str:
    """Unpack only the converter's files from the sdist; return the sdist's sha256."""
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            _, _, rel = m.name.partition("/vendor/llama.cpp/")
            if rel and (m.isfile() or m.isdir()) and rel.startswith(_KEEP):
                m.name = rel
                members.append(m)
        if not any(m.name == SCRIPT for m in members):
            raise ConvertError(f"{sdist.name} holds no vendor/llama.cpp/{SCRIPT}")
        advance = progress("Unpacking llama.cpp's converter", sum(m.size for m in members))
        for m in members:
            tar.extract(m, dest, filter="data")
            advance(m.size)
    return sha


# -- running it --------------------------------------------------------------------------------


def convert(
    converter: Converter,
    folder: Path,
    out: Path,
    outtype: str,
    expected_bytes: int,
    progress: ProgressFactory,
    label: str | None = None,
) -> Path:
    """Run the converter on `folder`, writing `out`; its last error line if it refuses."""
    check_dependencies()
    cmd = [sys.executable, str(converter.script), str(folder), "--outfile", str(out)]
    cmd += ["--outtype", check_outtype(outtype)]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    # Everything it reads is in the folder: no hub lookups, whatever the environment says.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    advance = progress(f"Converting to {outtype.upper()}", expected_bytes)
    tail = _watch(proc, lambda: out.stat().st_size if out.exists() else 0, advance)
    if proc.returncode != 0 or not out.is_file():
        raise ConvertError(
            f"llama.cpp's converter (llama-cpp-python {converter.version}) could not convert "
            f"{label or folder.name}: {last_error(tail)}"
        )
    return out


def last_error(lines: list[str]) -> str:
    """The converter's own reason: its last ERROR log line, else the exception it died of."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if m := _ERROR_LINE.match(ln):
            return m["msg"].strip()
    for ln in reversed(lines):
        if _EXCEPTION_LINE.match(ln):
            return ln
    return lines[-1] if lines else "it exited without saying why"


if __name__ == "__main__":  # `python -m freehold.adapt.converter`: fetch it ahead (make, CI)
    from freehold.progress import byte_progress

    with byte_progress() as bars:
        found = ensure_converter(lambda text: print(text, file=sys.stderr), bars)
    print(found.script)
