"""GGUF fuzzing: damaged copies of the real SmolLM2 and Gemma headers through `add`, `show`, `run`.

For every mutated file (bit flips, truncation at every boundary, huge counts and lengths,
wrong types, duplicate keys and names, offsets past the end, flipped values; see
gguf_mutations.py):

- `add` either stores it, and then `show` describes it, or refuses in one line with a
  non-zero exit, no traceback and the vault exactly as it was (no blob, row or temp file);
- whatever the vault accepts, llama.cpp's own GGUF reader opens: the scanner is never
  looser than the engine behind it;
- a sample of whole files goes through `freehold run` in a child process: it answers or
  refuses in one line, and never dies of a signal;
- the header values on which llama.cpp aborts the process, rather than refusing the file,
  are refused before it sees them (and each case checks llama.cpp still aborts on them).

Examples scale with the Hypothesis profile (tests/conftest.py): the default "ci" profile has
a fixed seed and runs about 2,000 files through `add`; `--hypothesis-profile=deep` runs 10x
more, freshly drawn each time.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import vault_state
from gguf import GGUFValueType
from gguf_mutations import (
    KV,
    MUTATIONS,
    Built,
    Seed,
    build,
    full_seed,
    llama_cpp_opens,
    set_field,
    small_seed,
    value_flips,
    write_whole,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freehold.vault import Vault
from freehold.vault.gguf_meta import read_header

SCALE = settings.default.max_examples / 100  # 1 under "ci", 10 under "deep"
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def seeds(smollm2_path: Path, gemma_path: Path) -> dict[str, tuple[Seed, Built]]:
    out = {}
    for label, path in (("smollm2", smollm2_path), ("gemma", gemma_path)):
        seed = small_seed(path, label)
        out[label] = (seed, build(seed))
    return out


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _refused_cleanly(r, home: Path, before: tuple, what: str) -> None:  # noqa: ANN001
    lines = _lines(r.err)
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{what}: {r.err!r}"
    assert vault_state(home) == before, f"{what}: the vault changed"
    assert list((home / "tmp").glob("*")) == [], f"{what}: a staged file was left"


def _add_then_show(cli, home: Path, path: Path, data: bytes, what: str, link: bool) -> bool:  # noqa: ANN001
    """Add one mutated file; check the outcome either way. True when it was accepted."""
    path.unlink(missing_ok=True)  # a blob --link'ed last time shares this inode: start afresh
    path.write_bytes(data)
    name = f"fuzz:{next(_names)}"  # fresh each time, so one failure cannot mask the next
    before = vault_state(home)
    r = cli("add", path, "--name", name, *(["--link"] if link else []))
    if r.code != 0:
        _refused_cleanly(r, home, before, what)
        return False
    assert llama_cpp_opens(path), f"{what}: the vault accepted a header llama.cpp refuses"
    shown = cli("show", name)
    assert shown.code == 0 and name in shown.out, f"{what}: {shown.err!r}"
    _remove(home, name)
    assert vault_state(home) == before
    return True


def _remove(home: Path, name: str) -> None:
    """Make room for the next file (through the library: `rm` is not what is under test).
    The `home` fixture has pointed FREEHOLD_HOME at `home`."""
    with Vault() as vault:
        vault.remove(name)


_names = itertools.count()


# ---- the properties -------------------------------------------------------------------------


def _fuzz_add_and_show(seeds, label: str, home: Path, cli, tmp_path: Path, examples: int):  # noqa: ANN001, ANN202
    seed, built = seeds[label]
    outcomes: dict[str, list[int]] = {k: [0, 0] for k in MUTATIONS}

    @settings(FUZZ, max_examples=examples)
    @given(kind=st.sampled_from(list(MUTATIONS)), rnd=st.randoms(), link=st.booleans())
    def check(kind: str, rnd: random.Random, link: bool) -> None:
        data, what = MUTATIONS[kind](seed, built, rnd)
        accepted = _add_then_show(cli, home, tmp_path / "mutant.gguf", data, what, link)
        outcomes[kind][accepted] += 1

    check()
    return outcomes


def test_mutated_smollm2_headers_are_added_or_refused_in_one_line(
    seeds, home: Path, cli, tmp_path: Path
) -> None:
    examples = int(1500 * SCALE)
    outcomes = _fuzz_add_and_show(seeds, "smollm2", home, cli, tmp_path, examples)
    _both_outcomes_seen(outcomes, examples)


def test_mutated_gemma_headers_are_added_or_refused_in_one_line(
    seeds, home: Path, cli, tmp_path: Path
) -> None:
    examples = int(500 * SCALE)
    outcomes = _fuzz_add_and_show(seeds, "gemma", home, cli, tmp_path, examples)
    _both_outcomes_seen(outcomes, examples)


def _both_outcomes_seen(outcomes: dict[str, list[int]], examples: int) -> None:
    """All the examples ran, every class among them, and the run saw both acceptances (so
    `show` was exercised) and refusals: a fuzz run that only ever refuses proves little."""
    assert sum(map(sum, outcomes.values())) >= examples, outcomes
    assert all(sum(v) > 0 for v in outcomes.values()), outcomes
    assert sum(v[0] for v in outcomes.values()) > 0, outcomes
    assert sum(v[1] for v in outcomes.values()) > 0, outcomes


def test_whole_mutated_files_run_or_refuse_in_one_line(
    smollm2_path: Path, gemma_path: Path, home: Path, cli, tmp_path: Path
) -> None:
    """Whole files with damaged key values (hyperparameters, token ids, vocabulary, template)
    go through `freehold run`: by vault name when `add` accepts them, else by path, which
    hands them straight to llama.cpp. A child process, so a crash in llama.cpp shows."""
    full = {
        label: (seed, build(seed))
        for label, seed in (
            ("smollm2", full_seed(smollm2_path, "smollm2")),
            ("gemma", full_seed(gemma_path, "gemma")),
        )
    }
    env = {**os.environ, "FREEHOLD_HOME": str(home), "GGML_NO_BACKTRACE": "1"}
    answered = []

    @settings(FUZZ, max_examples=int(12 * SCALE))
    @given(label=st.sampled_from(["smollm2"] * 3 + ["gemma"]), rnd=st.randoms())
    def check(label: str, rnd: random.Random) -> None:
        seed, built = full[label]
        header, what = value_flips(seed, built, rnd)
        path = tmp_path / f"{label}.gguf"
        path.unlink(missing_ok=True)
        write_whole(path, seed, header)
        before = vault_state(home)
        name = f"fuzz:run{next(_names)}"
        added = cli("add", path, "--name", name, "--link")
        if added.code != 0:
            _refused_cleanly(added, home, before, what)
        target = name if added.code == 0 else str(path)
        cmd = [sys.executable, "-m", "freehold", "run", target, "Hi", "--max-tokens", "4"]
        raw = ["--raw"] if label == "gemma" else []  # a base model: no chat template
        p = subprocess.run(
            [*cmd, *raw, "--temperature", "0", "--ctx", "256"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode >= 0, f"{what}: `run` died of signal {-p.returncode}: {p.stderr}"
        assert "Traceback" not in p.stderr, f"{what}: {p.stderr}"
        if p.returncode != 0:
            assert len(_lines(p.stderr)) == 1, f"{what}: {p.stderr!r}"
            assert p.stderr.startswith("error:"), f"{what}: {p.stderr!r}"
        answered.append((p.returncode == 0, what, p.stderr.strip()[-200:]))
        if added.code == 0:
            _remove(home, name)

    check()
    ran = [ok for ok, _, _ in answered]
    assert any(ran) and not all(ran), answered  # both outcomes were exercised


# ---- the case from the issue, and each check on its own --------------------------------------


def test_bit_flips_in_a_vocabulary_length_are_refused_in_one_line(
    home: Path, cli, smollm2_path: Path, tmp_path: Path
) -> None:
    """Issue 13: three flipped bits in one token's length prefix made `add` die with
    `OSError: [Errno 22] Invalid argument` from the scanner's seek, instead of refusing."""
    built = build(full_seed(smollm2_path, "smollm2"))
    prefix = next(f for f in built.fields if f.label == "tokenizer.ggml.tokens[4096] length")
    path = tmp_path / "flipped.gguf"
    shutil.copyfile(smollm2_path, path)
    with open(path, "r+b") as f:
        f.seek(prefix.start + 6)  # bits 48-55 of the little-endian length
        f.write(bytes([0b1000_0101]))
    before = vault_state(home)
    r = cli("add", path, "--name", "flipped")
    assert r.code == 2
    _refused_cleanly(r, home, before, "three flipped bits")
    assert "is truncated or has a corrupted GGUF header" in r.err
    assert "a string in key 'tokenizer.ggml.tokens' claims" in r.err
    assert not llama_cpp_opens(path)  # llama.cpp refuses it too


def _retyped(seed: Seed, key: str, vtype: GGUFValueType, value: bytes) -> bytes:
    kvs = [KV(kv.key, vtype, value, []) if kv.key == key.encode() else kv for kv in seed.kvs]
    return build(Seed(**{**seed.__dict__, "kvs": kvs})).data


def _field(built: Built, label: str):  # noqa: ANN202
    return next(f for f in built.fields if f.label == label)


def _string(text: bytes) -> bytes:
    return len(text).to_bytes(8, "little") + text


# (what is damaged, how, what the one-line refusal says, whether llama.cpp refuses it too)
CASES = {
    "version": (lambda s, b: set_field(b.data, _field(b, "version"), 4), "version 4", True),
    "counts": (
        lambda s, b: set_field(b.data, _field(b, "key count"), 2**40),
        "a table of 61 tensors and 1099511627776 keys claims at least",
        True,
    ),
    "string length": (
        lambda s, b: set_field(b.data, _field(b, "key general.name length"), 2**62),
        "claims",
        True,
    ),
    "array count": (
        lambda s, b: set_field(b.data, _field(b, "tokenizer.ggml.tokens count"), 2**40),
        "claims 1099511627776 items",
        True,
    ),
    "nested array": (
        lambda s, b: set_field(b.data, _field(b, "tokenizer.ggml.tokens item type"), 9),
        "an array of arrays",
        True,
    ),
    "value type": (
        lambda s, b: set_field(b.data, _field(b, "key general.name type"), 99),
        "unknown value type 99",
        True,
    ),
    "empty key": (
        lambda s, b: set_field(b.data, _field(b, "key general.type length"), 0),
        "is empty",
        True,
    ),
    "duplicate key": (
        lambda s, b: build(Seed(**{**s.__dict__, "kvs": [*s.kvs, s.kvs[0]]})).data,
        "appears twice",
        True,
    ),
    "alignment": (
        lambda s, b: (
            build(
                Seed(
                    **{
                        **s.__dict__,
                        "kvs": [*s.kvs, KV(b"general.alignment", 4, b"\x03\0\0\0", [])],
                    }
                )
            ).data
        ),
        "not a power of two",
        True,
    ),
    "tensor dims": (
        lambda s, b: set_field(b.data, _field(b, "tensor output_norm.weight dimension count"), 5),
        "dimensions, the limit is 4",
        True,
    ),
    "tensor size": (
        lambda s, b: set_field(b.data, _field(b, "tensor output_norm.weight dim 0"), 2**63),
        "too large for int64",
        True,
    ),
    "tensor type": (
        lambda s, b: set_field(b.data, _field(b, "tensor output_norm.weight type"), 31),
        "unknown type 31",
        True,
    ),
    "tensor blocks": (
        lambda s, b: set_field(b.data, _field(b, "tensor output_norm.weight type"), 12),
        "not whole Q4_K blocks",
        True,
    ),
    "tensor offset": (
        lambda s, b: set_field(b.data, _field(b, "tensor output_norm.weight offset"), 2**40),
        "claims data offset 1099511627776",
        True,
    ),
    "data cut": (lambda s, b: b.data[: len(b.data) - 100], "is truncated", False),
    "name type": (
        lambda s, b: _retyped(s, "general.name", GGUFValueType.UINT32, b"\x2a\0\0\0"),
        "general.name holds the int 42, not a string",
        False,
    ),
    "count type": (
        lambda s, b: _retyped(
            s, "llama.context_length", GGUFValueType.FLOAT32, b"\x00\x00\x00\x46"
        ),
        "llama.context_length holds the float 8192.0, not a count",
        False,
    ),
    "architecture name": (
        lambda s, b: _retyped(s, "general.architecture", GGUFValueType.STRING, _string(b"x[/]")),
        "general.architecture 'x[/]' is not a name",
        False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_header_check_refuses_in_one_line(
    case: str, seeds, home: Path, cli, tmp_path: Path
) -> None:
    seed, built = seeds["smollm2"]
    mutate, says, llama_refuses = CASES[case]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(mutate(seed, built))
    before = vault_state(home)
    r = cli("add", path, "--name", "damaged")
    assert r.code == 2
    _refused_cleanly(r, home, before, case)
    assert says in r.err
    # Container damage is what llama.cpp's reader refuses as well; a wrong type in a key the
    # catalog reads, or tensor data cut short, only shows later in llama.cpp (at model load).
    assert llama_cpp_opens(path) is not llama_refuses


# Header values llama.cpp does not refuse but aborts the whole process on (GGML_ASSERT), each
# found by the fuzzing above: the scanner must refuse them before llama.cpp sees them.
def _one_token_twice(seed: Seed, built: Built) -> bytes:
    i = seed.key_index("tokenizer.ggml.tokens")
    value = seed.kvs[i].value.replace(b"\x01" + bytes(7) + b"a", b"\x01" + bytes(7) + b"c", 1)
    kvs = [*seed.kvs[:i], KV(seed.kvs[i].key, seed.kvs[i].vtype, value, []), *seed.kvs[i + 1 :]]
    return build(Seed(**{**seed.__dict__, "kvs": kvs})).data


def _rope_scaling(seed: Seed, built: Built) -> bytes:
    kv = KV(b"llama.rope.scaling.type", GGUFValueType.STRING, _string(b"linaer"), [])
    return build(Seed(**{**seed.__dict__, "kvs": [*seed.kvs, kv]})).data


ABORTS = {
    "no layers": (
        lambda s, b: set_field(b.data, _field(b, "llama.block_count"), 0),
        "llama.block_count is 0, outside 1..512",
    ),
    "a token twice": (_one_token_twice, "holds the token 'c' twice, as ids 81 and 83"),
    "unknown rope scaling": (_rope_scaling, "llama.rope.scaling.type is 'linaer'"),
    "key/value heads": (  # one flipped bit: 3 becomes 2**29 + 3, which wraps in uint32 sums
        lambda s, b: set_field(b.data, _field(b, "llama.attention.head_count_kv"), 2**29 + 3),
        "9 attention heads and 536870915 key/value heads",
    ),
}
_RAW_LOAD = """
import sys
import llama_cpp as ll
from freehold.engine.model import ensure_backend, load_params
ensure_backend()
model = ll.llama_model_load_from_file(sys.argv[1].encode(), load_params())
params = ll.llama_context_default_params()
params.n_ctx = 64
sys.exit(3 if not model else 0 if ll.llama_init_from_model(model, params) else 4)
"""


@pytest.mark.parametrize("case", list(ABORTS))
def test_headers_llama_cpp_aborts_on_are_refused_first(
    case: str, smollm2_path: Path, home: Path, cli, tmp_path: Path
) -> None:
    seed = full_seed(smollm2_path, "smollm2")
    mutate, says = ABORTS[case]
    path = tmp_path / "damaged.gguf"
    write_whole(path, seed, mutate(seed, build(seed)))
    env = {**os.environ, "FREEHOLD_HOME": str(home), "GGML_NO_BACKTRACE": "1"}

    # llama.cpp itself, given the file straight: the process dies
    raw = subprocess.run([sys.executable, "-c", _RAW_LOAD, str(path)], env=env, timeout=300)
    assert raw.returncode == -signal.SIGABRT, f"{case}: llama.cpp no longer aborts: relax the check"

    # Freehold: `add` and `run` (by path, so straight to the engine) refuse in one line
    before = vault_state(home)
    added = cli("add", path, "--name", "damaged", "--link")
    assert added.code == 2 and says in added.err, added.err
    _refused_cleanly(added, home, before, case)
    run = [sys.executable, "-m", "freehold", "run", str(path), "Hi", "--max-tokens", "2"]
    p = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(_lines(p.stderr)) == 1 and says in p.stderr, p.stderr


def test_seeds_are_sound_and_read_alike(
    seeds, smollm2_path: Path, gemma_path: Path, tmp_path: Path
) -> None:
    """The unmutated small seeds are whole GGUFs, and the scanner reads the real files'
    tensor tables as this independent walker does."""
    for label, path in (("smollm2", smollm2_path), ("gemma", gemma_path)):
        _, tensors = read_header(path)
        walked = full_seed(path, label).tensors
        assert [(t.name, t.offset, t.n_bytes) for t in tensors] == [
            (t.name.decode(), t.source_offset, t.n_bytes) for t in walked
        ]
    for label, (_, built) in seeds.items():
        small = tmp_path / f"{label}.gguf"
        small.write_bytes(built.data)
        assert llama_cpp_opens(small)
        read_header(small)
