"""Training data is checked line by line, and every problem names its line, before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freehold.adapt.datasets import load_jsonl, split
from freehold.errors import InvalidInput

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}


def _write(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_three_shapes_are_detected(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        GOOD,
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
    )
    examples = load_jsonl(path)
    assert [e.shape for e in examples] == ["chat", "sharegpt", "alpaca"]
    assert examples[1].messages[1] == {"role": "assistant", "content": "A"}
    assert examples[2].messages[0]["content"] == "Translate\n\nchat"


def test_the_shipped_test_dataset_loads() -> None:
    examples = load_jsonl(Path(__file__).parent / "data" / "verdict.jsonl")
    assert len(examples) == 50 and {e.shape for e in examples} == {"chat", "sharegpt", "alpaca"}
    train, val = split(examples, 0.1, 0)
    assert len(val) == 5 and len(train) == 45
    assert split(examples, 0.1, 0) == (train, val)  # reproducible


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ('{"messages": [', "not valid JSON"),
        ({"messages": [{"role": "user", "content": "Q?"}]}, "the record has no assistant turn"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
        ({"prompt": "x", "completion": "y"}, "unrecognised record"),
        ([1, 2], "each line must be a JSON object"),
    ],
)
def test_bad_records_name_their_line(tmp_path: Path, bad: object, says: str) -> None:
    path = _write(tmp_path, GOOD, bad, GOOD)
    with pytest.raises(InvalidInput) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and says in str(e.value)


def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "", "   ")
    with pytest.raises(InvalidInput, match="is empty"):
        load_jsonl(path)
