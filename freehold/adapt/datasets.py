"""Training data in the shapes teams already have, checked line by line before any training.

Each JSONL line is one conversation in one of three shapes, detected per line:
- chat: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
- ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}
- Alpaca: {"instruction": "...", "input": "...", "output": "..."}
Every problem names its line, so a bad record costs seconds, not a failed training run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freehold.errors import InvalidInput, NotFound

Message = dict[str, str]

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass
class Example:
    line: int
    messages: list[Message]
    shape: str  # chat | sharegpt | alpaca


def _bad(path: Path, line: int, why: str) -> InvalidInput:
    return InvalidInput(f"{path}:{line}: {why}")


def _chat(path: Path, line: int, raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise _bad(path, line, '"messages" must be a non-empty list of {role, content}')
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise _bad(path, line, f"message {i} needs a string 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(
                path, line, f"message {i} has unknown role {role!r}: use system, user, assistant"
            )
        out.append({"role": role, "content": m["content"]})
    return out


def _sharegpt(path: Path, line: int, raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise _bad(path, line, '"conversations" must be a non-empty list of {from, value}')
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise _bad(path, line, f"turn {i} needs a string 'value'")
        who = m.get("from")
        if who not in SHAREGPT_ROLES:
            raise _bad(path, line, f"turn {i} has unknown role {who!r}: use system, human or gpt")
        out.append({"role": SHAREGPT_ROLES[who], "content": m["value"]})
    return out


def _alpaca(path: Path, line: int, raw: dict[str, Any]) -> list[Message]:
    for key in ("instruction", "output"):
        if not isinstance(raw.get(key), str):
            raise _bad(path, line, f"an Alpaca record needs a string '{key}'")
    prompt = raw["instruction"]
    if isinstance(raw.get("input"), str) and raw["input"].strip():
        prompt = f"{prompt}\n\n{raw['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": raw["output"]}]


def parse_record(path: Path, line: int, text: str) -> Example:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(path, line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise _bad(path, line, "each line must be a JSON object")
    if "messages" in raw:
        messages, shape = _chat(path, line, raw["messages"]), "chat"
    elif "conversations" in raw:
        messages, shape = _sharegpt(path, line, raw["conversations"]), "sharegpt"
    elif "instruction" in raw:
        messages, shape = _alpaca(path, line, raw), "alpaca"
    else:
        raise _bad(
            path,
            line,
            "unrecognised record: expected 'messages' (chat), 'conversations' (ShareGPT) or "
            "'instruction'/'output' (Alpaca)",
        )
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _bad(path, line, "the record has no assistant turn to learn from")
    return Example(line, messages, shape)


def load_jsonl(path: Path) -> list[Example]:
    """All records, or an InvalidInput naming the first bad line."""
    if not path.is_file():
        raise NotFound(f"no training data at {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if text.strip():
                examples.append(parse_record(path, n, text))
    if not examples:
        raise InvalidInput(f"{path} is empty: give one JSON record per line")
    return examples


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """A held-out validation split (at least one example) chosen reproducibly."""
    import random

    if len(examples) < 2:
        raise InvalidInput("need at least 2 examples: one to train on and one to validate with")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    val = {i for i in order[:n_val]}
    return (
        [e for i, e in enumerate(examples) if i not in val],
        [e for i, e in enumerate(examples) if i in val],
    )
