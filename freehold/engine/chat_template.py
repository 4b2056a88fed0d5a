"""Render chat messages with the model's own Jinja2 template (transformers' apply_chat_template
semantics) or a built-in one, and parse tool calls back out of generated text.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from freehold.errors import InvalidInput

Message = dict[str, Any]

_TOOL_PROMPT = (
    "You may call functions to help with the user's request. The available functions, as JSON "
    "Schema, are:\n<tools>\n{tools}\n</tools>\nTo call a function, reply with only "
    '<tool_call>{{"name": <function name>, "arguments": <arguments object>}}</tool_call>'
)


class ChatTemplateError(InvalidInput):
    """The model's chat template failed on these messages (or the model has none)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent)


def _env() -> ImmutableSandboxedEnvironment:
    # The same environment transformers uses: trimmed blocks, sandboxed, tojson without escaping.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template plus the special-token texts it refers to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _env().from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None
        self.supports_tools = "tools" in source
        self.supports_tool_calls = "tool_calls" in source

    def render(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`, ending with the assistant turn opener if asked."""
        msgs = _normalised(messages)
        if tools and not self.supports_tools:
            msgs = _inject_tools(msgs, tools)
        if not self.supports_tool_calls:
            msgs = [_inline_tool_calls(m) for m in msgs]
        ctx: dict[str, Any] = {
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
        }
        if tools:
            ctx["tools"] = tools
        try:
            return self._template.render(**ctx)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected these messages: {e}") from None


def _normalised(messages: list[Message]) -> list[Message]:
    """Copies of the messages with text content (callers' dicts are never modified)."""
    if not messages:
        raise InvalidInput("a chat needs at least one message")
    out = []
    for i, orig in enumerate(messages):
        if not isinstance(orig, dict) or "role" not in orig:
            raise InvalidInput(f"message {i} needs a 'role' (system, user, assistant or tool)")
        m = dict(orig)
        out.append(m)
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep only the text parts
            m["content"] = "".join(
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and p.get("type") == "text"
            )
        elif content is None:
            m["content"] = ""
        elif not isinstance(content, str):
            raise InvalidInput(f"message {i} content must be text")
    return out


def _inject_tools(msgs: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
    """For templates with no notion of tools: describe them in the system message."""
    spec = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    text = _TOOL_PROMPT.format(tools=spec)
    if msgs and msgs[0].get("role") == "system":
        msgs[0] = {**msgs[0], "content": f"{msgs[0].get('content', '')}\n\n{text}".strip()}
        return msgs
    return [{"role": "system", "content": text}, *msgs]


def _inline_tool_calls(m: Message) -> Message:
    """An assistant turn's tool calls as text, for templates that cannot render them."""
    calls = m.get("tool_calls")
    if m.get("role") != "assistant" or not calls:
        return m
    parts = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        call = {"name": fn.get("name"), "arguments": args}
        parts.append(f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>")
    return {**m, "content": (m.get("content") or "") + "".join(parts)}


# -- choosing a template ----------------------------------------------------------------------

# Written for Freehold from the published turn formats; see freehold/engine/templates/.
BUILTIN_TEMPLATES = ("chatml", "gemma", "llama3")

# A conversation every chat format can render, to tell whether two templates agree.
_PROBE: list[Message] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def builtin_template(name: str) -> str:
    """The source of a built-in template; InvalidInput naming the built-ins if there is none."""
    if name not in BUILTIN_TEMPLATES:
        raise InvalidInput(f"no built-in chat template {name!r}; built-ins: {_builtin_names()}")
    return files("freehold.engine").joinpath("templates", f"{name}.jinja").read_text("utf-8")


def template_source(name_or_path: str) -> str:
    """The template source for `--chat-template NAME|FILE`: a built-in name, else a Jinja file.

    A built-in name wins over a file of the same name in the working directory (write ./NAME
    for the file). A file that does not compile is refused here, before any model loads.
    """
    if name_or_path in BUILTIN_TEMPLATES:
        return builtin_template(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise InvalidInput(
            f"--chat-template {name_or_path!r} is neither a built-in ({_builtin_names()}) "
            "nor a Jinja template file"
        )
    try:
        source = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read chat template {path}: {e}") from None
    try:
        _env().from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template {path} does not compile: {e}") from None
    return source


def describe_template(own: str | None, override: str | None = None) -> str:
    """One line on the template a chat would use: `override` (NAME|FILE) if given, else the
    model's own source `own`, naming the built-in it renders like when there is one."""
    if override is not None:
        size = len(template_source(override))
        kind = "built-in" if override in BUILTIN_TEMPLATES else "file"
        return f"{kind} {override} ({size} characters), given by --chat-template"
    if own is None:
        return "none: a base model; pass --chat-template NAME to chat with it"
    twin = _builtin_twin(own)
    like = f"; renders chat like the built-in {twin}" if twin else ""
    return f"the model's own ({len(own)} characters{like})"


def _builtin_twin(source: str) -> str | None:
    """The built-in that renders the probe conversation exactly as `source` does, if any."""
    tokens = {"bos_token": "<BOS>", "eos_token": "<EOS>"}
    try:
        own = ChatTemplate(source, **tokens).render(_PROBE)
    except Exception:  # any failure of the model's template on the probe just means no twin
        return None
    for name in BUILTIN_TEMPLATES:
        if ChatTemplate(builtin_template(name), **tokens).render(_PROBE) == own:
            return name
    return None


def _builtin_names() -> str:
    return ", ".join(BUILTIN_TEMPLATES)


# -- tool-call parsing -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for; `arguments` is a JSON string, as in OpenAI's API."""

    id: str
    name: str
    arguments: str


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content, tool calls).

    Understands `<tool_call>{json}</tool_call>` blocks (an object or a list of objects each) and,
    as a fallback, a reply that is nothing but such JSON. Text that is not a call is content.
    """
    calls: list[ToolCall] = []
    if "<tool_call>" in text:
        for block in _TAGGED.findall(text):
            calls.extend(_calls_from_json(block))
        if calls:
            content = _TAGGED.sub("", text).strip()
            return content, calls
    stripped = text.strip()
    fence = _FENCE.match(stripped)
    if fence:
        stripped = fence.group(1)
    if stripped[:1] in "{[":
        calls = _calls_from_json(stripped)
        if calls:
            return "", calls
    return text, []


def _calls_from_json(blob: str) -> list[ToolCall]:
    try:
        data = json.loads(blob)
    except json.JSONDecodeError:
        return []
    items = data if isinstance(data, list) else [data]
    out: list[ToolCall] = []
    for it in items:
        if not isinstance(it, dict):
            return []
        it = it.get("function", it)
        name = it.get("name")
        args = it.get("arguments", it.get("parameters", {}))
        if not isinstance(name, str) or not name:
            return []
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out.append(ToolCall(id=f"call_{secrets.token_hex(12)}", name=name, arguments=args))
    return out
