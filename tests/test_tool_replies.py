"""The reply splitter every API door shares: text released early, tool calls at the end."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freehold.engine import ReplySplitter, ToolCall, split_reply

TOOLS = {"f", "g"}
CALL_F = '<tool_call>{"name": "f", "arguments": {"a": 2}}</tool_call>'


def _calls(calls: list[ToolCall]) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _streamed(pieces: list[str], tools=TOOLS, **kw) -> tuple[list[str], str, list]:
    """What a stream shows piece by piece, the text left at the end, and the calls."""
    s = ReplySplitter(tools, **kw)
    shown = [s.feed(p) for p in pieces]
    rest, calls = s.finish()
    assert "".join(shown) + rest == s.text
    return shown, rest, calls


@pytest.mark.parametrize(
    "reply,text,calls",
    [
        ("Hello there", "Hello there", []),
        ('{"name": "f", "arguments": {"a": 1}}', "", [("f", {"a": 1})]),
        ('```json\n{"name": "f", "arguments": {}}\n```', "", [("f", {})]),
        (
            '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]',
            "",
            [("f", {}), ("g", {})],
        ),
        ("Sure.\n" + CALL_F, "Sure.", [("f", {"a": 2})]),
        ("  \n" + CALL_F, "", [("f", {"a": 2})]),  # whitespace before a call is dropped
        ("Sure. " + CALL_F + " Done.", "Sure.\n\nDone.", [("f", {"a": 2})]),
        # arguments that are not a JSON object: no call, the whole reply is text
        (
            '<tool_call>{"name": "f", "arguments": "1"}</tool_call>',
            '<tool_call>{"name": "f", "arguments": "1"}</tool_call>',
            [],
        ),
        ('{"name": "f", "arguments": [1]}', '{"name": "f", "arguments": [1]}', []),
        # one bad call spoils them all
        (CALL_F + '<tool_call>{"name": "g", "arguments": 3}</tool_call>', None, []),
        # a tool that was not offered: a JSON answer, not a call
        ('{"name": "Paris", "arguments": {}}', '{"name": "Paris", "arguments": {}}', []),
        ('<tool_call>{"name": "h", "arguments": {}}</tool_call>', None, []),
        ("a < b and <tool", "a < b and <tool", []),
        ("{not json", "{not json", []),
        ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
        ("", "", []),
    ],
)
def test_streamed_or_whole_give_the_same(reply: str, text: str | None, calls: list) -> None:
    text = reply if text is None else text
    whole_text, whole_calls = split_reply(reply, TOOLS)
    assert whole_text == text and _calls(whole_calls) == calls
    # Character by character, the same comes out; text that could start a call is held back.
    shown, rest, streamed = _streamed(list(reply))
    assert "".join(shown) + rest == text and _calls(streamed) == calls
    if calls:
        assert "<tool_call>" not in "".join(shown)


def test_text_is_released_before_the_reply_ends() -> None:
    shown, rest, calls = _streamed(["Hel", "lo ", "wor", "ld. <tool", "_call>", '{"name"'])
    assert shown == ["Hel", "lo", " wor", "ld.", "", ""]  # trailing space and '<tool' wait
    assert rest == ' <tool_call>{"name"' and calls == []
    # A reply that opens like a fenced or bare call is held, until it cannot be one.
    shown, _, _ = _streamed(["``", "`b", "ash\nls"])
    assert shown == ["", "```b", "ash\nls"]
    shown, _, _ = _streamed(["  {", " ", '"name'])
    assert shown == ["", "", ""]
    shown, _, _ = _streamed(["[", "1]", " and more"])
    assert shown == ["", "[1]", " and more"]


def test_without_tools_everything_is_text_at_once() -> None:
    reply = CALL_F + " trailing "
    assert split_reply(reply) == (reply, [])
    shown, rest, calls = _streamed([reply[:5], reply[5:]], tools=())
    assert shown == [reply[:5], reply[5:]] and rest == "" and calls == []


def test_only_one_call_without_parallel_calls() -> None:
    one = '<tool_call>{{"name": "{}", "arguments": {{}}}}</tool_call>'
    two = one.format("f") + one.format("g")
    assert [c.name for c in split_reply(two, TOOLS)[1]] == ["f", "g"]
    assert [c.name for c in split_reply(two, TOOLS, parallel=False)[1]] == ["f"]
    assert [c.name for c in split_reply(two, TOOLS, max_calls=1)[1]] == ["f"]
    assert split_reply(two) == (two, [])


def test_calls_carry_ids_and_object_arguments() -> None:
    _, calls = split_reply('{"function": {"name": "g", "parameters": {"q": "x"}}}', TOOLS)
    (call,) = calls
    assert call.id.startswith("call_") and call.name == "g"
    assert json.loads(call.arguments) == {"q": "x"}


# -- property: streaming never changes the answer ----------------------------------------------

_PIECES = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        '{"name": "f", "arguments": {"a": 1}}',
        '{"name": "g", "arguments": "x"}',
        '{"name": "h", "arguments": {}}',
        '"name"',
        "```json",
        "```",
        "<tool",
        "<",
        "{",
        "[",
        "]",
        "}",
        " ",
        "\n",
        "json",
        "Hi",
    ]
)
_REPLIES = st.lists(_PIECES | st.text(max_size=4), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(reply=_REPLIES, data=st.data(), parallel=st.booleans())
def test_any_cutting_gives_the_whole_reply_answer(reply: str, data, parallel: bool) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(reply)), max_size=8)))
    bounds = [0, *cuts, len(reply)]
    pieces = [reply[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    whole_text, whole_calls = split_reply(reply, TOOLS, parallel=parallel)
    shown, rest, calls = _streamed(pieces, parallel=parallel)
    assert "".join(shown) + rest == whole_text
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    if not calls:
        assert whole_text == reply  # nothing of a reply that is not a call is lost
    else:
        assert "<tool_call>" not in whole_text
