"""Safetensors round trip: a Hugging Face folder made from SmolLM2, kept and converted to GGUF.

The folder is written by transformers from the packaged Q4_1 GGUF (dequantized to float32,
`save_pretrained` as safetensors), then `freehold add DIR` keeps it whole and converts it with
llama.cpp's own converter. llama.cpp's converter is fetched once, outside the tests (make does
it: `python -m freehold.adapt.converter`); no test here reaches beyond this machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

import pytest
from conftest import vault_state

from freehold.adapt import converter
from freehold.adapt.quantizer import quantize
from freehold.config import paths
from freehold.measure.eval import evaluate
from freehold.server.lifecycle import choose_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def cached_converter() -> None:
    if not (converter.converter_dir() / converter.SCRIPT).is_file():
        pytest.fail(
            "llama.cpp's converter is not cached: run `.venv/bin/python -m "
            "freehold.adapt.converter` once (make does), then rerun"
        )


def _add(*args: object) -> subprocess.CompletedProcess:
    """The real CLI in its own process, as a user runs it."""
    cmd = [sys.executable, "-m", "freehold", "add", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _blob(home: Path, digest: str) -> Path:
    return home / "blobs" / digest.replace(":", "-")


def test_folder_round_trip(
    home: Path,
    cli,
    hf_folder: Path,
    smollm2_path: Path,
    tmp_path: Path,
    monkeypatch,
    capsys,
    cached_converter,
) -> None:
    started = time.monotonic()
    done = _add(hf_folder)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "smollm2-135m-instruct:safetensors → smollm2-135m-instruct:f16" in done.stdout
    with capsys.disabled():  # the figures the docs quote; `pytest -s` shows them
        print(f"\nadd DIR (store 540 MB, convert 135M params to F16): {took:.1f} s")

    folder = cli("show", "smollm2-135m-instruct:safetensors", "--json").json()
    gguf = cli("show", "smollm2-135m-instruct:f16", "--json").json()
    # The folder is kept whole: every file a verified blob, the manifest naming them all.
    assert folder["format"] == "safetensors" and folder["kind"] == "model"
    assert folder["architecture"] == "LlamaForCausalLM" and folder["quantization"] == "F32"
    kept = {f["filename"]: f for f in folder["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "LICENSE", "README.md"} <= set(
        kept
    )
    manifest = json.loads(_blob(home, folder["digest"]).read_text())
    assert {f["path"]: f["digest"] for f in manifest["files"]} == {
        name: f["digest"] for name, f in kept.items()
    }
    assert folder["license_profile"]["id"] == "apache-2.0"
    # The GGUF names the folder as its parent, with how it was made.
    assert gguf["format"] == "gguf" and gguf["quantization"] == "F16"
    assert gguf["parent_digest"] == folder["digest"]
    assert gguf["derivation"]["operation"] == "convert"
    assert gguf["derivation"]["outtype"] == "F16"
    assert gguf["derivation"]["llama_cpp_python"] == metadata.version("llama-cpp-python")
    assert gguf["license_profile"]["id"] == "apache-2.0"
    assert sorted(f["filename"] for f in gguf["files"]) == ["LICENSE", "README.md"]
    shown = cli("show", "smollm2-135m-instruct:f16").out
    assert "Derived from" in shown and "smollm2-135m-instruct:safetensors" in shown
    assert "smollm2-135m-instruct:f16" in cli("show", "smollm2-135m-instruct:safetensors").out
    assert cli("verify").code == 0

    # Quality: the F16 is the Q4_1 original's own weights, so it loses less than a Q8_0 of it.
    q8 = quantize(smollm2_path, tmp_path / "q8_0.gguf", "Q8_0", allow_requantize=True).path
    f16_kl = evaluate(_blob(home, gguf["digest"]), smollm2_path, max_chunks=4).mean_kl
    q8_kl = evaluate(q8, smollm2_path, max_chunks=4).mean_kl
    with capsys.disabled():
        print(f"mean KL vs the Q4_1 original: F16 {f16_kl:.6f}, Q8_0 requantized {q8_kl:.6f}")
    assert f16_kl is not None and q8_kl is not None and f16_kl <= q8_kl

    # The kept original is not something llama.cpp loads: run says which GGUF to use.
    refused = cli("run", "smollm2-135m-instruct:safetensors", "Hi", "--max-tokens", "2")
    assert refused.code != 0 and "use its GGUF: smollm2-135m-instruct:f16" in refused.err
    refused = cli("quantize", "smollm2-135m-instruct:safetensors", "--to", "Q8_0")
    assert refused.code != 0 and "use its GGUF: smollm2-135m-instruct:f16" in refused.err
    # `serve` with no --model serves the vault's GGUFs, not the folder.
    assert list(choose_models([], print, paths())) == ["smollm2-135m-instruct:f16"]

    # Again, with --to: the folder and its F16 are reused, the quantized GGUF hangs off the F16.
    again = cli("add", hf_folder, "--to", "Q8_0")
    assert again.code == 0, again.err
    q = cli("show", "smollm2-135m-instruct:q8_0", "--json").json()
    assert q["parent_digest"] == gguf["digest"] and q["derivation"]["type"] == "Q8_0"
    assert q["quantization"] == "Q8_0" and q["license_profile"]["id"] == "apache-2.0"
    assert len(cli("list", "--json").json()) == 3
    assert "already converted" in cli("add", hf_folder).out

    # A bundle carries the folder and its GGUF; the other vault rebuilds both from the bytes.
    bundle = tmp_path / "smol.tar"
    refs = ["smollm2-135m-instruct:safetensors", "smollm2-135m-instruct:f16"]
    assert cli("export", *refs, "-o", bundle).code == 0
    monkeypatch.setenv("FREEHOLD_HOME", str(tmp_path / "other"))
    imported = cli("import", bundle)
    assert imported.code == 0, imported.err
    assert cli("show", refs[0], "--json").json()["files"] == folder["files"]
    assert cli("show", refs[1], "--json").json()["parent_digest"] == folder["digest"]
    assert cli("verify").code == 0
    monkeypatch.setenv("FREEHOLD_HOME", str(home))

    # verify re-hashes every file of the folder, not only its manifest.
    weights = _blob(home, kept["model.safetensors"]["digest"])
    weights.chmod(0o644)
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = cli("verify")
    assert damaged.code == 3 and "model.safetensors" in damaged.err


def _copy(src: Path, dst: Path, skip: str = "") -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.name != skip:
            os.symlink(p, dst / p.name)
    return dst


def _refused(home: Path, folder: Path, says: str) -> None:
    before = vault_state(home)
    done = _add(folder)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert says in lines[0], lines[0]
    assert vault_state(home) == before
    assert list((home / "tmp").glob("*")) == []


def test_bad_folders_are_refused(home: Path, hf_folder: Path, tmp_path: Path, cached_converter):
    _refused(home, _copy(hf_folder, tmp_path / "a", skip="config.json"), "has no config.json")

    no_weights = _copy(hf_folder, tmp_path / "b", skip="model.safetensors")
    _refused(home, no_weights, "has no *.safetensors weights")

    truncated = _copy(hf_folder, tmp_path / "c", skip="model.safetensors")
    data = (hf_folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 4096])
    _refused(home, truncated, "model.safetensors is not a valid safetensors file")

    garbled = _copy(hf_folder, tmp_path / "d", skip="model.safetensors")
    (garbled / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!}" + data[24:4096]
    )
    _refused(home, garbled, "model.safetensors is not a valid safetensors file")

    unknown = _copy(hf_folder, tmp_path / "e", skip="config.json")
    config = json.loads((hf_folder / "config.json").read_text())
    config["architectures"] = ["FreeholdTestForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(config))
    _refused(home, unknown, "Model FreeholdTestForCausalLM is not supported")


# -- fetching the converter: pip download from a local --find-links (the index is not here) -----


def _fake_sdist(where: Path, version: str) -> Path:
    """A stand-in llama-cpp-python sdist (same name and version) that pip can prepare offline."""
    top = f"llama_cpp_python-{version}"
    members = {
        "pyproject.toml": '[build-system]\nrequires = ["setuptools"]\n'
        'build-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "llama_cpp_python"\nversion = "{version}"\n',
        "PKG-INFO": f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n",
        "vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
        "vendor/llama.cpp/conversion/__init__.py": "",
        "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        "vendor/llama.cpp/models/templates/chatml.jinja": "{{ messages }}",
        "vendor/llama.cpp/LICENSE": "MIT License",
        "vendor/llama.cpp/src/llama.cpp": "// not part of the converter",
    }
    where.mkdir()
    sdist = where / f"{top}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sdist


def test_converter_is_fetched_once_and_whole(tmp_path: Path, monkeypatch) -> None:
    version = metadata.version("llama-cpp-python")
    sdist = _fake_sdist(tmp_path / "index", version)
    monkeypatch.setenv("FREEHOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")  # the venv's setuptools, no index needed
    said: list[str] = []

    # Nothing to fetch from: one clear error, and no half-made cache.
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(converter.ConvertError, match="could not fetch llama-cpp-python"):
        converter.ensure_converter(said.append, lambda _d, _t: lambda _n: None)
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setenv("PIP_FIND_LINKS", str(sdist.parent))
    found = converter.ensure_converter(said.append, lambda _d, _t: lambda _n: None)
    assert found.script == cache / f"llama-cpp-python-{version}" / converter.SCRIPT
    assert found.sdist_sha256 == hashlib.sha256(sdist.read_bytes()).hexdigest()
    kept = sorted(str(p.relative_to(found.script.parent)) for p in found.script.parent.rglob("*"))
    assert "src" not in kept and "models/templates/chatml.jinja" in kept
    assert "gguf-py/gguf/__init__.py" in kept and "LICENSE" in kept
    assert len(said) == 2 and str(sdist.parent) in said[-1]  # says where from, before fetching
    assert converter.ensure_converter(said.append, lambda _d, _t: lambda _n: None) == found
    assert len(said) == 2  # cached: no second fetch
