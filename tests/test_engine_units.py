"""Engine parts that need no model: stop strings, tool-call parsing, templates, grammars."""

from __future__ import annotations

import json

import pytest

from freehold.engine import ChatTemplate, SamplingParams, parse_tool_calls
from freehold.engine.chat_template import ChatTemplateError
from freehold.engine.grammar import JSON_OBJECT_GBNF, gbnf_for, schema_to_gbnf
from freehold.engine.stops import StopMatcher
from freehold.errors import InvalidInput


def _feed_all(m: StopMatcher, pieces: list[bytes]) -> str:
    out = "".join(m.feed(p) for p in pieces)
    return out + m.flush()


def test_stop_across_pieces_is_cut_and_never_emitted() -> None:
    m = StopMatcher(["END"])
    emitted = []
    for p in [b"hello E", b"N", b"D tail"]:
        emitted.append(m.feed(p))
        assert "E" not in "".join(emitted)[5:]  # the held 'E'/'EN' never escapes early
    assert "".join(emitted) == "hello " and m.stopped


def test_held_prefix_released_when_it_is_not_a_stop() -> None:
    m = StopMatcher(["END"])
    assert m.feed(b"an E") == "an "
    assert m.feed(b"X") == "EX"
    assert _feed_all(StopMatcher(["END"]), [b"ok E"]) == "ok E"  # flushed at the end


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert _feed_all(m, [b"hel", b"lo wor", b"ld"]) == "hel"


def test_split_utf8_is_held_until_complete() -> None:
    data = "héllo €".encode()
    m = StopMatcher([])
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert _feed_all(m, pieces) == "héllo €"


def test_parse_tagged_tool_calls() -> None:
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert calls[0].name == "f" and json.loads(calls[0].arguments) == {"x": 1}


def test_parse_list_and_bare_json_tool_calls() -> None:
    _, calls = parse_tool_calls(
        '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b"}]</tool_call>'
    )
    assert [c.name for c in calls] == ["a", "b"]
    content, calls = parse_tool_calls('```json\n{"name": "g", "parameters": {"q": "x"}}\n```')
    assert content == "" and calls[0].name == "g" and json.loads(calls[0].arguments) == {"q": "x"}


def test_plain_text_and_bad_json_are_content() -> None:
    for text in ("Just words.", '{"not": "a call"}', "<tool_call>{broken</tool_call>"):
        content, calls = parse_tool_calls(text)
        assert calls == [] and content == text


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_renders_like_transformers() -> None:
    t = ChatTemplate(CHATML)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert (
        t.render(msgs)
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not t.render(msgs, add_generation_prompt=False).endswith("assistant\n")


def test_template_without_tools_support_gets_tools_in_system_prompt() -> None:
    t = ChatTemplate(CHATML)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    out = t.render([{"role": "user", "content": "U"}], tools=tools)
    assert out.startswith("<|im_start|>system\n") and "lookup" in out and "<tool_call>" in out


def test_template_with_tools_variable_gets_them() -> None:
    t = ChatTemplate(
        "{% for t in tools %}{{ t.function.name }};{% endfor %}{{ messages[0].content }}"
    )
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    assert t.render([{"role": "user", "content": "U"}], tools=tools) == "lookup;U"


def test_template_raise_exception_is_a_clear_error() -> None:
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidInput):
        t.render([])


def test_grammars() -> None:
    assert gbnf_for(SamplingParams()) is None
    assert gbnf_for(SamplingParams(json_mode=True)) == JSON_OBJECT_GBNF
    g = schema_to_gbnf({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert "root ::=" in g
    with pytest.raises(InvalidInput):
        gbnf_for(SamplingParams(grammar="start ::= 'x'"))
