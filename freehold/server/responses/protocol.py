"""OpenAI's Responses API (`POST /v1/responses`): request and response models (pydantic), the
request's conversion to engine parameters (`to_sampling_params`) and to chat messages.

Requests are strict (extra="forbid"). Codex CLI and the OpenAI Agents SDK send fields that
have no meaning for a local model (`reasoning`, `include`, `prompt_cache_key`,
`client_metadata`, ...): those are declared below and ignored, as docs/responses.md lists.
Fields Freehold cannot honour (`background`, `conversation`, stored `prompt`s, logprobs,
image or file input) are refused with a 400 naming them. Hosted tools (`web_search`,
`file_search`, ...) are neither offered to the model nor refused: Codex sends them on every
request; the route reports them in the `x-freehold-ignored-tools` header.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    model_validator,
)

from freehold.engine import SamplingParams
from freehold.server.errors import UnsupportedParameter
from freehold.server.openai.protocol import FunctionDef, tool_call_schema

TEXT_ONLY = "Freehold serves text models: send input_text parts only"
_MEDIA_PARTS = ("input_image", "input_file", "input_audio")
_MAX_METADATA = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _kind(value: Any) -> Any:
    """The `type` of a raw item (a dict) or of a validated one (a model, when serialising)."""
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


def _text_or_list(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    return "list" if isinstance(value, list) else None


def _str_or_list(item: Any) -> Any:
    """`str | list[item]`, picked by the value's own type so that errors name one branch."""
    return Annotated[
        Annotated[str, Tag("text")] | Annotated[list[item], Tag("list")],  # type: ignore[valid-type]
        Discriminator(
            _text_or_list,
            custom_error_type="string_or_list",
            custom_error_message="must be a string or a list",
        ),
    ]


# -- request: content parts --------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    # Present when a client sends an earlier response's output back; nothing to use here.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class RefusedPart(BaseModel):
    """Any other content part: images, files and audio (text-only models), or unknown types."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        kind = _kind(data)
        if kind in _MEDIA_PARTS:
            raise UnsupportedParameter("input", f"content part of type {kind!r}: {TEXT_ONLY}")
        raise UnsupportedParameter(
            "input",
            f"unknown content part type {kind!r}; expected input_text, output_text or refusal",
        )


def _part_tag(value: Any) -> str:
    kind = _kind(value)
    if kind in ("input_text", "output_text"):
        return "text"
    return "refusal" if kind == "refusal" else "other"


Part = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[RefusedPart, Tag("other")],
    Discriminator(_part_tag),
]
Content = _str_or_list(Part)


def content_text(content: str | list[Any]) -> str:
    """The text of a message's content (refusals carry no text for the model)."""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if isinstance(p, TextPart))


# -- request: input items ----------------------------------------------------------------------


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None
    namespace: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Content
    id: str | None = None
    status: str | None = None
    name: str | None = None
    namespace: str | None = None


class ReasoningItem(BaseModel):
    """Reasoning carried over from an earlier turn: accepted and dropped (the models served
    here do not read it back)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]


_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


class RefusedItem(BaseModel):
    """Any other input item: hosted tools' calls and outputs, item references, unknown types."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise UnsupportedParameter("input", "each input item must be a JSON object")
        raise UnsupportedParameter(
            "input",
            f"input item of type {data.get('type')!r} is not supported; Freehold takes "
            "message, function_call and function_call_output items (reasoning is dropped)",
        )


def _item_tag(value: Any) -> str:
    if isinstance(value, dict):
        kind = value.get("type", "message" if "role" in value else None)
    else:
        kind = getattr(value, "type", None)
    return kind if kind in _ITEM_TYPES else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[RefusedItem, Tag("other")],
    Discriminator(_item_tag),
]
Input = _str_or_list(InputItem)
ITEMS = TypeAdapter(list[InputItem])


def template_messages(instructions: str | None, items: list[Any]) -> list[dict[str, Any]]:
    """Chat messages for the model's template, in OpenAI chat form.

    Instructions and leading system/developer messages become one system message (some
    templates, Gemma's among them, take a single system message first); function calls join
    the assistant turn before them; function outputs become `tool` messages.
    """
    system = [instructions] if instructions else []
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call_id -> function name, for templates that show it
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            text = content_text(item.content)
            if role == "system" and not out:
                system.append(text)
            else:
                out.append({"role": role, "content": text})
        elif isinstance(item, FunctionCallItem):
            names[item.call_id] = item.name
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            tool = {"role": "tool", "tool_call_id": item.call_id}
            name = item.name or names.get(item.call_id)
            if name:
                tool["name"] = name
            out.append({**tool, "content": content_text(item.output)})
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


# -- request: tools and formats ----------------------------------------------------------------


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    # Newer OpenAI options about deferred loading and programmatic callers: nothing to do here.
    defer_loading: bool | None = None
    allowed_callers: list[str] | None = None
    output_schema: dict[str, Any] | None = None

    def definition(self) -> FunctionDef:
        return FunctionDef(
            name=self.name,
            description=self.description,
            parameters=self.parameters,
            strict=self.strict,
        )

    def echo(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }


class HostedTool(BaseModel):
    """A tool OpenAI runs on its side (web_search, file_search, code_interpreter, mcp, ...) or
    a grouping Freehold does not expand (namespace, custom): never offered to the model."""

    model_config = ConfigDict(extra="allow")
    type: str


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[HostedTool, Tag("hosted")],
    Discriminator(lambda v: "function" if _kind(v) == "function" else "hosted"),
]


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _complete(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise UnsupportedParameter(
                "text.format", "text.format of type json_schema needs a 'name' and a 'schema'"
            )
        if self.type != "json_schema" and (self.name or self.schema_ is not None):
            raise UnsupportedParameter(
                "text.format", f"text.format of type {self.type} takes no name or schema"
            )
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # no such knob locally: ignored


# -- request -----------------------------------------------------------------------------------

# Known OpenAI fields Freehold cannot honour, with the values that are harmless to accept.
_REFUSED: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "context_management": (None,),
    "top_logprobs": (None, 0),
}
_REFUSED_WHY = {
    "background": "background responses are not supported; send the request and wait",
    "conversation": "the Conversations API is not supported; use previous_response_id",
    "prompt": "stored prompt templates are not supported; send instructions and input",
    "context_management": "server-side context management is not supported",
    "top_logprobs": "logprobs are not supported on /v1/responses; use /v1/chat/completions",
}


class ResponseRequest(_Strict):
    model: str
    input: Input
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | ToolChoiceFunction | dict[str, Any] | None,
        Field(union_mode="left_to_right"),
    ] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=128)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    user: str | None = Field(default=None, max_length=256)
    # Sent by Codex CLI and the Agents SDK; nothing to do with them locally (accepted, ignored).
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    client_metadata: dict[str, Any] | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Known to OpenAI, refused unless unset (see _REFUSED).
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseRequest:
        for name, allowed in _REFUSED.items():
            if getattr(self, name) not in allowed:
                raise UnsupportedParameter(name, _REFUSED_WHY[name])
        if self.metadata is not None and len(self.metadata) > _MAX_METADATA:
            raise UnsupportedParameter("metadata", "metadata holds at most 16 key-value pairs")
        if isinstance(self.input, list) and not self.input and not self.previous_response_id:
            raise UnsupportedParameter("input", "input must not be empty")
        self._check_tool_choice()
        if self.tools_active and self.text_format.type != "text":
            raise UnsupportedParameter(
                "text.format", "text.format json_object/json_schema cannot be combined with tools"
            )
        return self

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        if isinstance(choice, dict):
            raise UnsupportedParameter(
                "tool_choice",
                f"tool_choice of type {choice.get('type')!r} is not supported; Freehold runs "
                "function tools only (use auto, none, required or a function)",
            )
        names = {t.name for t in self.function_tools}
        if choice == "required" and not names:
            raise UnsupportedParameter("tool_choice", "tool_choice 'required' needs function tools")
        if isinstance(choice, ToolChoiceFunction) and choice.name not in names:
            raise UnsupportedParameter(
                "tool_choice",
                f"tool_choice names {choice.name!r}, which is not among the function tools",
            )

    # -- what the model sees -------------------------------------------------------------------

    @property
    def function_tools(self) -> list[FunctionTool]:
        return [t for t in self.tools or [] if isinstance(t, FunctionTool)]

    @property
    def ignored_tools(self) -> list[str]:
        """The types of the tools left out (hosted ones), each once, in the order sent."""
        kinds = [t.type for t in self.tools or [] if not isinstance(t, FunctionTool)]
        return list(dict.fromkeys(kinds))

    @property
    def tools_active(self) -> bool:
        return bool(self.function_tools) and self.tool_choice != "none"

    @property
    def tool_names(self) -> frozenset[str]:
        """The functions a reply may call (none when tool_choice is "none")."""
        return frozenset(t.name for t in self.function_tools) if self.tools_active else frozenset()

    @property
    def text_format(self) -> TextFormat:
        fmt = self.text.format if self.text else None
        return fmt or TextFormat(type="text")

    def input_items(self) -> list[Any]:
        """This request's input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is told about, in chat form (none when tool_choice is "none")."""
        if not self.tools_active:
            return None
        return [
            {"type": "function", "function": t.definition().model_dump(exclude_none=True)}
            for t in self.function_tools
        ]

    def forced_tools(self) -> list[FunctionTool]:
        if self.tool_choice == "required":
            return self.function_tools
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return [t for t in self.function_tools if t.name == self.tool_choice.name]
        return []

    def constraint(self) -> dict[str, Any]:
        """Grammar-constrained output for text.format and forced tool calls."""
        fmt = self.text_format
        if fmt.type == "json_object":
            return {"json_mode": True}
        if fmt.type == "json_schema":
            return {"json_schema": fmt.schema_} if fmt.schema_ else {"json_mode": True}
        forced = self.forced_tools() if self.tools_active else []
        if forced:
            return {"json_schema": tool_call_schema([t.definition() for t in forced])}
        return {}

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters; unset fields keep the engine's (llama.cpp's) defaults, and no
        max_output_tokens means until the model stops or the context ends."""
        d = SamplingParams()
        return SamplingParams(
            max_tokens=self.max_output_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            **self.constraint(),
        )

    def call_limit(self) -> int | None:
        """How many function calls one response may carry."""
        if self.parallel_tool_calls is False:
            return 1
        return self.max_tool_calls

    def echo(self) -> dict[str, Any]:
        """The request settings a response object repeats back (effective values)."""
        params = self.to_sampling_params()
        fmt = self.text_format.model_dump(by_alias=True, exclude_none=True)
        choice = self.tool_choice
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "temperature": params.temperature,
            "text": {"format": fmt},
            "tool_choice": choice.model_dump()
            if isinstance(choice, BaseModel)
            else choice or "auto",
            "tools": [t.echo() for t in self.function_tools],
            "top_p": params.top_p,
            "user": self.user,
        }


# -- response ----------------------------------------------------------------------------------


class _Out(BaseModel):
    """Response models: built by Freehold, so no validation of their own fields is needed."""


class OutputText(_Out):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(_Out):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallOut(_Out):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallOut


class InputTokensDetails(_Out):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(_Out):
    reasoning_tokens: int = 0


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> ResponseUsage:
        return cls(
            input_tokens=prompt,
            input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=completion,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=prompt + completion,
        )


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(_Out):
    code: str
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(_Out):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    store: bool
    reasoning: dict[str, Any] | None = None
    service_tier: str = "default"
    top_logprobs: int = 0
    truncation: Literal["disabled"] = "disabled"  # a prompt too long is refused, never cut
    # echoed from the request (ResponseRequest.echo)
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=dict)
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    user: str | None = None

    @property
    def output_text(self) -> str:
        return "".join(
            part.text
            for item in self.output
            if isinstance(item, OutputMessage)
            for part in item.content
        )


class DeletedResponse(_Out):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
