"""Anthropic's Messages API: request and response models (pydantic), the request's conversion
to the chat template's messages and tools, and to engine parameters (`to_sampling_params`).

Nested objects are strict (extra="forbid"): an unknown field inside a message, block or tool
is refused with a 400 naming it. The top level is not: Claude Code adds beta fields to every
release (`context_management`, `thinking`, `speed`...), and refusing one would lock the tool
out until Freehold caught up. Top-level fields Freehold does not use are accepted and named
back in the `x-freehold-ignored-fields` response header (see `ignored_fields`); the ones it
knows and cannot honour (`mcp_servers`, `container`, a final assistant turn) are refused.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from freehold.engine import SamplingParams, ToolCall
from freehold.server.errors import UnsupportedParameter
from freehold.server.openai.protocol import FunctionDef, tool_call_schema

MAX_STOP_SEQUENCES = 16  # the engine's limit

# Block types a message may hold, per role; the others are refused by name.
_ROLE_BLOCKS = {
    "user": {"text", "tool_result"},
    "assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
    "system": {"text"},
}
_BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")
_NOT_TEXT = {"image", "document", "container_upload", "browser_state"}
_SERVER_BLOCKS = {
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "tool_search_tool_result",
    "tool_reference",
    "mcp_tool_use",
    "mcp_tool_result",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# `cache_control` is accepted everywhere Anthropic allows it and ignored: Freehold reuses any
# shared prompt prefix by itself, without markers.
CacheControl = dict[str, Any] | None


# -- content blocks ----------------------------------------------------------------------------


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl = None
    citations: list[dict[str, Any]] | None = None  # from an earlier reply; not shown to the model


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]
    cache_control: CacheControl = None
    caller: dict[str, Any] | None = None
    toolset_name: str | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: TextOrTextBlocks | None = None
    is_error: bool = False
    cache_control: CacheControl = None
    toolset_name: str | None = None

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else _joined(self.content or [])
        # The template has no notion of a failed call: say so in the result's own text.
        return f"Error: {body}" if self.is_error else body


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


def _text_or_blocks(v: Any) -> str:
    return "text" if isinstance(v, str) else "blocks"


# A string or a list of blocks. Validated by one branch only, so a bad block is reported as
# itself, not as "content: Input should be a valid string".
TextOrTextBlocks = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[TextBlock], Tag("blocks")],
    Discriminator(_text_or_blocks),
]
Content = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[Block], Tag("blocks"), Field(min_length=1)],
    Discriminator(_text_or_blocks),
]


def _joined(blocks: list[TextBlock], sep: str = "\n") -> str:
    return sep.join(b.text for b in blocks)


def _check_block(block: Any, where: str, allowed: tuple[str, ...]) -> None:
    """Refuse a block type Freehold cannot use, by name, before pydantic's generic message."""
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str) or kind in allowed:
        return
    if kind in _NOT_TEXT:
        why = "the models Freehold serves read text only; send the content as text"
    elif kind in _SERVER_BLOCKS:
        why = "it belongs to a server tool, and Freehold runs no server tools"
    else:
        why = f"unknown block type; expected one of {', '.join(allowed)}"
    raise UnsupportedParameter(where, f"{where}: content blocks of type {kind!r}: {why}")


def _check_blocks(raw: Any) -> None:
    for i, m in enumerate(raw if isinstance(raw, list) else ()):
        content = m.get("content") if isinstance(m, dict) else None
        if content == []:
            where = f"messages.{i}.content"
            raise UnsupportedParameter(where, f"{where}: a message needs at least one block")
        for j, block in enumerate(content if isinstance(content, list) else ()):
            where = f"messages.{i}.content.{j}"
            _check_block(block, where, _BLOCK_TYPES)
            is_result = isinstance(block, dict) and block.get("type") == "tool_result"
            inner = block.get("content") if is_result else None
            for k, part in enumerate(inner if isinstance(inner, list) else ()):
                _check_block(part, f"{where}.content.{k}", ("text",))


# -- messages ----------------------------------------------------------------------------------


class InputMessage(_Strict):
    role: Literal["user", "assistant", "system"]
    content: Content

    @model_validator(mode="after")
    def _blocks_fit_role(self) -> InputMessage:
        allowed = _ROLE_BLOCKS[self.role]
        for block in self.content if isinstance(self.content, list) else ():
            if block.type not in allowed:
                raise UnsupportedParameter(
                    "messages", f"a {self.role} message cannot hold a {block.type!r} block"
                )
        return self

    def for_template(self, tool_names: dict[str, str]) -> list[dict[str, Any]]:
        """This turn as the chat template's messages. `tool_names` maps the tool_use ids seen
        so far to their tools' names (a tool result names the tool it answers)."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role == "assistant":
            return _assistant_turn(self.content, tool_names)
        return _user_turn(self.role, self.content, tool_names)


def _assistant_turn(blocks: list[Any], tool_names: dict[str, str]) -> list[dict[str, Any]]:
    # Thinking from earlier turns is dropped: the models served here never produced it.
    text = _joined([b for b in blocks if isinstance(b, TextBlock)])
    calls = []
    for b in blocks:
        if isinstance(b, ToolUseBlock):
            tool_names[b.id] = b.name
            fn = {"name": b.name, "arguments": b.input}
            calls.append({"id": b.id, "type": "function", "function": fn})
    if not text and not calls:
        return []
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        turn["tool_calls"] = calls
    return [turn]


def _user_turn(role: str, blocks: list[Any], tool_names: dict[str, str]) -> list[dict[str, Any]]:
    """Text blocks and tool results in their order: each result a "tool" message, each run of
    text between them one message of `role`."""
    out: list[dict[str, Any]] = []
    texts: list[TextBlock] = []
    for b in blocks:
        if isinstance(b, TextBlock):
            texts.append(b)
            continue
        if texts:
            out.append({"role": role, "content": _joined(texts)})
            texts = []
        tool = {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
        if b.tool_use_id in tool_names:
            tool["name"] = tool_names[b.tool_use_id]
        out.append(tool)
    if texts:
        out.append({"role": role, "content": _joined(texts)})
    return out


# -- tools -------------------------------------------------------------------------------------


class CustomTool(_Strict):
    """A tool the client runs: offered to the model."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl = None
    strict: bool | None = None
    input_examples: list[dict[str, Any]] | None = None
    defer_loading: bool | None = None
    eager_input_streaming: bool | None = None
    allowed_callers: list[str] | None = None

    def function(self) -> FunctionDef:
        # Built without validation: Anthropic's names may be longer than OpenAI's 64.
        return FunctionDef.model_construct(
            name=self.name, description=self.description, parameters=self.input_schema
        )

    def for_template(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


class ServerTool(BaseModel):
    """A tool Anthropic runs on its side (`web_search_20250305`, `bash_20250124`...). Freehold
    cannot run them, so they are left out of what the model sees, not refused: clients such
    as Claude Code send them with every request."""

    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None


def _tool_kind(v: Any) -> str:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "custom" if kind in (None, "custom") else "server"


ToolDef = Annotated[
    Annotated[CustomTool, Tag("custom")] | Annotated[ServerTool, Tag("server")],
    Discriminator(_tool_kind),
]


class ToolChoiceAuto(_Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Strict):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


# -- requests ----------------------------------------------------------------------------------


class Metadata(_Strict):
    user_id: str | None = Field(default=None, max_length=256)


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OutputConfig(_Strict):
    format: OutputFormat | None = None
    effort: str | None = None  # how hard a Claude model thinks; nothing to tune here


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # header-safe; used with fullmatch


class _MessagesBase(BaseModel):
    """What /v1/messages and /v1/messages/count_tokens share: the prompt."""

    model_config = ConfigDict(extra="allow")  # see the module docstring

    model: str = Field(min_length=1, max_length=256)
    messages: list[InputMessage] = Field(min_length=1)
    system: TextOrTextBlocks | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's spelling
    # known, and refused unless empty: Freehold connects to nothing on a client's behalf
    mcp_servers: list[dict[str, Any]] | None = None
    container: str | dict[str, Any] | None = None
    # known, accepted and ignored (named back in x-freehold-ignored-fields)
    thinking: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None
    cache_control: CacheControl = None

    IGNORED: ClassVar[tuple[str, ...]] = ("thinking", "context_management", "cache_control")

    @field_validator("messages", mode="before")
    @classmethod
    def _known_blocks(cls, raw: Any) -> Any:
        _check_blocks(raw)
        return raw

    @model_validator(mode="after")
    def _check(self) -> _MessagesBase:
        if self.mcp_servers:
            raise UnsupportedParameter(
                "mcp_servers", "mcp_servers is not supported: Freehold makes no outbound calls"
            )
        if self.container is not None:
            raise UnsupportedParameter("container", "container is not supported by Freehold")
        if self.messages[-1].role == "assistant":
            raise UnsupportedParameter(
                "messages",
                "a final assistant message (prefill) is not supported by Freehold; "
                "end with a user message",
            )
        self._check_tool_choice()
        if self.output_schema is not None and self.tools_active:
            raise UnsupportedParameter(
                "output_config", "a JSON output format cannot be combined with tools in Freehold"
            )
        return self

    def _check_tool_choice(self) -> None:
        tc = self.tool_choice
        if not isinstance(tc, ToolChoiceAny | ToolChoiceTool):
            return
        names = [t.name for t in self.custom_tools]
        if not names:
            raise UnsupportedParameter(
                "tool_choice", f"tool_choice {tc.type!r} needs at least one custom tool"
            )
        if isinstance(tc, ToolChoiceTool) and tc.name not in names:
            raise UnsupportedParameter(
                "tool_choice",
                f"tool_choice names {tc.name!r}, which is not among the tools Freehold can "
                "offer (server tools are left out)",
            )

    # -- what the model sees -------------------------------------------------------------------

    @property
    def custom_tools(self) -> list[CustomTool]:
        return [t for t in self.tools or [] if isinstance(t, CustomTool)]

    @property
    def left_out_tools(self) -> list[str]:
        """The server tools not offered to the model, by type (header-safe ones only)."""
        kinds = [t.type for t in self.tools or [] if isinstance(t, ServerTool)]
        return [k for k in kinds if _NAME.fullmatch(k)][:32]

    @property
    def tools_active(self) -> bool:
        return bool(self.custom_tools) and not isinstance(self.tool_choice, ToolChoiceNone)

    @property
    def tool_names(self) -> frozenset[str]:
        """The tools a reply may call (none when tool_choice is "none")."""
        return frozenset(t.name for t in self.custom_tools) if self.tools_active else frozenset()

    @property
    def parallel_tool_use(self) -> bool:
        tc = self.tool_choice
        return not (tc is not None and getattr(tc, "disable_parallel_tool_use", None))

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system or None
        return _joined(self.system, "\n\n") or None

    def template_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        system = self.system_text()
        if system:
            out.append({"role": "system", "content": system})
        tool_names: dict[str, str] = {}
        for m in self.messages:
            out.extend(m.for_template(tool_names))
        return out

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is told about (none when tool_choice is "none")."""
        if not self.tools_active:
            return None
        return [t.for_template() for t in self.custom_tools]

    @property
    def output_schema(self) -> dict[str, Any] | None:
        fmt = self.output_format or (self.output_config.format if self.output_config else None)
        return None if fmt is None else fmt.schema_

    def forced_tools(self) -> list[CustomTool]:
        tc = self.tool_choice
        if isinstance(tc, ToolChoiceAny):
            return self.custom_tools
        if isinstance(tc, ToolChoiceTool):
            return [t for t in self.custom_tools if t.name == tc.name]
        return []

    def constraint(self) -> dict[str, Any]:
        """Grammar-constrained output: a forced tool call, or a JSON output format."""
        forced = self.forced_tools()
        if forced:
            return {"json_schema": tool_call_schema([t.function() for t in forced])}
        schema = self.output_schema
        return {} if schema is None else {"json_schema": schema}

    def ignored_fields(self) -> list[str]:
        """Top-level fields sent but without effect: known ones Freehold has no use for, and
        unknown ones (newer betas). Only header-safe names are listed."""
        names = [n for n in self.IGNORED if getattr(self, n) is not None]
        if self.output_config is not None and self.output_config.effort is not None:
            names.append("output_config.effort")
        names += [n for n in self.model_extra or {} if _NAME.fullmatch(n)]
        return names[:32]


class MessagesRequest(_MessagesBase):
    max_tokens: int = Field(ge=1)  # required, as Anthropic's API has it; capped by the context
    stream: bool = False
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    service_tier: str | None = None  # one tier here

    IGNORED: ClassVar[tuple[str, ...]] = (*_MessagesBase.IGNORED, "service_tier")

    @property
    def user(self) -> str | None:
        return self.metadata.user_id if self.metadata else None

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters; unset fields keep the engine's (llama.cpp's) defaults."""
        d = SamplingParams()
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=d.top_k if self.top_k is None else self.top_k,
            stop=list(self.stop_sequences or []),
            **self.constraint(),
        )


class CountTokensRequest(_MessagesBase):
    pass


# -- responses ---------------------------------------------------------------------------------


class _Out(BaseModel):
    """Response models: built by Freehold, so no validation of their own fields is needed."""


class TextOut(_Out):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(_Out):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]

    @classmethod
    def of(cls, call: ToolCall) -> ToolUseOut:
        """A call found by `split_reply` (whose arguments are always a JSON object)."""
        tool_id = "toolu_" + call.id.removeprefix("call_")
        return cls(id=tool_id, name=call.name, input=json.loads(call.arguments))

    @property
    def input_json(self) -> str:
        return json.dumps(self.input, ensure_ascii=False)


class Usage(_Out):
    """Anthropic counts uncached input apart from input read from the cache: `input_tokens`
    plus `cache_read_input_tokens` is the whole prompt. Freehold's prefix cache is written as
    a side effect of every prompt, never billed apart: `cache_creation_input_tokens` is 0."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> Usage:
        return cls(
            input_tokens=prompt - cached, output_tokens=completion, cache_read_input_tokens=cached
        )


StopReason = Literal[
    "end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"
]


class Message(_Out):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextOut | ToolUseOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(_Out):
    input_tokens: int


class ErrorDetail(_Out):
    type: str
    message: str


class ErrorBody(_Out):
    type: Literal["error"] = "error"
    error: ErrorDetail
