"""`--chat-template NAME|FILE`: built-in templates, the resolver, a base model chatting, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freehold.engine import Engine, EngineConfig, SamplingParams
from freehold.engine.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    describe_template,
    template_source,
)
from freehold.errors import InvalidInput

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Weather in Paris?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_ROUND_TRIP = [
    *CONVERSATION,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
]
OPENER = {
    "chatml": "<|im_start|>assistant\n",
    "gemma": "<start_of_turn>model\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
BOS = {"chatml": "", "gemma": "<bos>", "llama3": "<|begin_of_text|>"}


def _template(name: str) -> ChatTemplate:
    return ChatTemplate(template_source(name), bos_token=BOS[name])


# -- unit: the built-ins and the resolver --------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_renders_a_conversation(name: str) -> None:
    text = _template(name).render(CONVERSATION)
    assert text.startswith(BOS[name]) and text.endswith(OPENER[name])
    for part in ("Be brief.", "Hi", "Hello.", "Weather in Paris?"):
        assert part in text
    assert text.index("Be brief.") < text.index("Hi") < text.index("Hello.")
    assert (
        not _template(name).render(CONVERSATION, add_generation_prompt=False).endswith(OPENER[name])
    )


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_renders_a_tool_round_trip(name: str) -> None:
    text = _template(name).render(TOOL_ROUND_TRIP, tools=TOOLS)
    assert text.endswith(OPENER[name])
    assert "get_weather" in text.split("Hi")[0]  # the tools are described before the chat
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert '{"temp_c": 18}' in text


def test_exact_turn_formats() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert _template("chatml").render(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    # Gemma has no system role: the system text opens the first user turn.
    assert _template("gemma").render(msgs) == (
        "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n"
    )
    assert _template("llama3").render(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_tool_results_have_their_own_turns() -> None:
    call = {"role": "assistant", "content": "", "tool_calls": TOOL_ROUND_TRIP[4]["tool_calls"]}
    msgs = [
        {"role": "user", "content": "U"},
        call,
        {"role": "tool", "content": "R1"},
        {"role": "tool", "content": "R2"},
    ]
    assert "<|im_start|>tool\nR1<|im_end|>\n<|im_start|>tool\nR2<|im_end|>" in _template(
        "chatml"
    ).render(msgs)
    # Gemma: consecutive results share one user turn.
    assert (
        "<start_of_turn>user\n<tool_response>\nR1\n</tool_response>\n"
        "<tool_response>\nR2\n</tool_response><end_of_turn>\n<start_of_turn>model\n"
    ) in _template("gemma").render(msgs)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nR1<|eot_id|>" in _template(
        "llama3"
    ).render(msgs)


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_refuses_an_unknown_role(name: str) -> None:
    with pytest.raises(ChatTemplateError, match=f"{name} template cannot render role 'narrator'"):
        _template(name).render([{"role": "user", "content": "U"}, {"role": "narrator"}])


def test_gemma_refuses_a_late_system_message() -> None:
    msgs = [{"role": "user", "content": "U"}, {"role": "system", "content": "S"}]
    with pytest.raises(ChatTemplateError, match="only as the first message"):
        _template("gemma").render(msgs)


def test_gemma_renders_a_lone_system_message() -> None:
    text = _template("gemma").render([{"role": "system", "content": "S"}])
    assert text == "<bos><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("bad", ["nosuch", "/no/such/template.jinja"])
def test_unknown_name_or_missing_file(bad: str) -> None:
    with pytest.raises(InvalidInput, match="chatml, gemma, llama3") as e:
        template_source(bad)
    assert "\n" not in str(e.value)


def test_template_file(tmp_path: Path) -> None:
    good = tmp_path / "mine.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    source = template_source(str(good))
    assert ChatTemplate(source).render([{"role": "user", "content": "U"}]) == "[user] U\n"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        template_source(str(bad))


def test_describe_template() -> None:
    assert describe_template(None).startswith("none: a base model; pass --chat-template NAME")
    chatml = template_source("chatml")
    assert describe_template(chatml) == (
        f"the model's own ({len(chatml)} characters; renders chat like the built-in chatml)"
    )
    assert describe_template("{{ messages[0]['content'] }}") == "the model's own (28 characters)"
    assert describe_template(None, "gemma").startswith("built-in gemma (")


# -- a real base model chatting ------------------------------------------------------------------


def _gemma_engine(path: Path, template: str | None) -> Engine:
    cfg = EngineConfig(chat_template=template, n_ctx_per_slot=1024, n_slots=1, n_threads=2)
    return Engine(path, cfg)


def test_base_model_chats_with_an_override(gemma_path: Path) -> None:
    with _gemma_engine(gemma_path, template_source("gemma")) as eng:
        assert eng.chat_template_origin == "override"
        assert eng.render_chat(CONVERSATION).startswith("<bos><start_of_turn>user\nBe brief.")
        params = SamplingParams(max_tokens=48, temperature=0)
        c = eng.chat([{"role": "user", "content": "What is the capital of France?"}], params)
        result = c.result(timeout=120)
        # The one BOS is the template's; the tokenizer adds no second one.
        prompt = eng.render_chat([{"role": "user", "content": "What is the capital of France?"}])
        assert result.usage.prompt_tokens == len(eng.tokenize(prompt, add_special=False))
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert "<end_of_turn>" not in result.text


def test_end_of_turn_ends_generation(gemma_path: Path) -> None:
    """Gemma's turn end is an end-of-generation token: the reply stops there, unprinted."""
    with _gemma_engine(gemma_path, template_source("gemma")) as eng:
        (end,) = eng.model.tokenize("<end_of_turn>", add_special=False)
        assert eng.model.is_eog(end)
        # Force the turn end as the first token (a base model seldom ends a turn by itself).
        params = SamplingParams(max_tokens=32, temperature=0, logit_bias={end: 100.0})
        result = eng.chat([{"role": "user", "content": "Hi"}], params).result(timeout=120)
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 1 and result.text == ""


def test_base_model_without_override_cannot_chat(gemma_path: Path) -> None:
    with _gemma_engine(gemma_path, None) as eng:
        assert eng.chat_template_origin is None
        with pytest.raises(ChatTemplateError, match="--chat-template NAME"):
            eng.chat([{"role": "user", "content": "Hi"}])


# -- the real CLI --------------------------------------------------------------------------------


def test_cli_run_with_a_builtin(cli, gemma_path: Path) -> None:  # noqa: ANN001 - fixture
    args = ["run", gemma_path, "Say hi", "--chat-template", "gemma", "--max-tokens", "8"]
    r = cli(*args, "--temperature", "0", "--threads", "2", "--ctx", "512", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["text"].strip() and "<end_of_turn>" not in out["text"]


def test_cli_unknown_template_is_one_line(cli, gemma_path: Path) -> None:  # noqa: ANN001
    r = cli("run", gemma_path, "Say hi", "--chat-template", "nosuch")
    assert r.code != 0
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "nosuch" in lines[0] and "chatml, gemma, llama3" in lines[0]


def test_cli_show_states_the_template(cli, home: Path, smollm2_path: Path, gemma_path: Path):  # noqa: ANN001, ANN201
    assert cli("add", smollm2_path, "--name", "s:1").code == 0
    r = cli("show", "s:1")
    assert r.code == 0, r.err
    assert "the model's own (" in r.out and "renders chat like the built-in chatml" in r.out
    assert cli("add", gemma_path, "--name", "g:1", "--link").code == 0
    r = cli("show", "g:1")
    assert "none: a base model; pass --chat-template NAME to chat with it" in r.out
    r = cli("show", "g:1", "--chat-template", "gemma")
    assert "built-in gemma (" in r.out
