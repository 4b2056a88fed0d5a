"""OpenAI's chat, completions, embeddings and models APIs: request and response models
(pydantic), and each request's conversion to engine parameters (`to_sampling_params`).

Unknown fields are rejected (extra="forbid"), and fields OpenAI defines that Freehold cannot
honour are declared here only so that a non-default value is refused with a 400 naming it,
never silently ignored. Freehold's extensions are marked "extension" below (llama.cpp names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from freehold.engine import SamplingParams, logit_bias_from_strings
from freehold.server.errors import UnsupportedParameter

if TYPE_CHECKING:
    from freehold.server.generation import Generation

_SEED_MOD = 2**32 - 1

# Known OpenAI parameters Freehold cannot honour, with the values that are harmless to accept.
_UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "store": (None, False),
    "metadata": (None,),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
    "verbosity": (None,),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}
_UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {"suffix": (None,)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _reject(obj: BaseModel, table: dict[str, tuple[Any, ...]]) -> None:
    for name, allowed in table.items():
        value = getattr(obj, name)
        if value not in allowed:
            raise UnsupportedParameter(name, f"'{name}' is not supported by Freehold")


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding option; nothing to pad locally


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise UnsupportedParameter(
                "response_format", "response_format of type json_schema needs a 'json_schema'"
            )
        return self


class ChatMessage(BaseModel):
    # Messages pass through to the chat template, which may read fields beyond OpenAI's
    # (e.g. "name", "reasoning_content"); only the role is checked here.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        for part in self.content if isinstance(self.content, list) else ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedParameter(
                    "messages",
                    f"content part of type {part.get('type')!r} is not supported; "
                    "Freehold serves text models (send text parts only)",
                )
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template expects it ("developer" is OpenAI's new "system")."""
        m = self.model_dump(exclude_none=True)
        if m["role"] == "developer":
            m["role"] = "system"
        return m


class _Sampling(_Strict):
    """Fields both generation endpoints share."""

    model: str
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)
    # extensions (llama.cpp's names and meanings)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, index: int, **extra: Any) -> SamplingParams:
        """Engine parameters for choice `index`; unset fields keep the engine's (llama.cpp's)
        defaults. With a seed, choice i uses seed + i, so n > 1 choices differ reproducibly.
        `extra`: the logprobs and grammar settings each endpoint decides."""
        d = SamplingParams()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.token_limit,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=d.top_k if self.top_k is None else self.top_k,
            min_p=d.min_p if self.min_p is None else self.min_p,
            repeat_penalty=d.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=logit_bias_from_strings(self.logit_bias),
            seed=None if self.seed is None else (self.seed + index) % _SEED_MOD,
            stop=stop,
            ignore_eos=self.ignore_eos,
            **extra,
        )

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameter(
                "stream_options", "stream_options is only allowed when stream is true"
            )
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    # known to OpenAI, refused here unless harmless (see _UNSUPPORTED_CHAT)
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        _reject(self, _UNSUPPORTED_CHAT)
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedParameter("top_logprobs", "top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise UnsupportedParameter("tool_choice", "tool_choice needs 'tools'")
        if isinstance(self.tool_choice, ToolChoiceFunction):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise UnsupportedParameter(
                    "tool_choice",
                    f"tool_choice names {self.tool_choice.function.name!r}, "
                    "which is not among 'tools'",
                )
        if self.tools and self.response_format and self.response_format.type != "text":
            raise UnsupportedParameter(
                "response_format", "response_format cannot be combined with tools in Freehold"
            )
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise UnsupportedParameter(
                "max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one"
            )
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def tools_active(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_names(self) -> frozenset[str]:
        """The tools a reply may call (none when tool_choice is "none")."""
        tools = self.tools if self.tools_active else None
        return frozenset(t.function.name for t in tools or [])

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is told about (none when tool_choice is "none")."""
        if not self.tools_active:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def forced_tools(self) -> list[Tool]:
        tools = self.tools or []
        if self.tool_choice == "required":
            return list(tools)
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return [t for t in tools if t.function.name == self.tool_choice.function.name]
        return []

    def constraint(self) -> dict[str, Any]:
        """Grammar-constrained output for response_format and forced tool calls."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return {"json_mode": True}
        if rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            schema = rf.json_schema.schema_
            return {"json_schema": schema} if schema else {"json_mode": True}
        forced = self.forced_tools()
        if forced:
            return {"json_schema": tool_call_schema([t.function for t in forced])}
        return {}

    def to_sampling_params(self, index: int = 0) -> SamplingParams:
        return self._params(
            index,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            **self.constraint(),
        )


def tool_call_schema(functions: list[FunctionDef]) -> dict[str, Any]:
    """JSON Schema for one call `{"name": ..., "arguments": {...}}` to one of `functions`: the
    grammar a forced tool choice constrains the model's reply to."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        _reject(self, _UNSUPPORTED_COMPLETION)
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter(
                "best_of", "best_of must equal n in Freehold (no server-side reranking)"
            )
        if isinstance(self.prompt, list) and not self.prompt:
            raise UnsupportedParameter("prompt", "prompt must not be empty")
        return self

    @model_validator(mode="after")
    def _echo(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise UnsupportedParameter(
                "echo", "echo with logprobs is not supported (no prompt log-probabilities)"
            )
        return self

    @property
    def token_limit(self) -> int | None:
        # The legacy endpoint's documented default is 16 tokens.
        return 16 if self.max_tokens is None else self.max_tokens

    def to_sampling_params(self, index: int = 0) -> SamplingParams:
        want = self.logprobs is not None
        return self._params(index, logprobs=want, top_logprobs=self.logprobs or 0)

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class EmbeddingRequest(_Strict):
    model: str
    input: Annotated[str | list[str] | list[int] | list[list[int]], Field()]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _check(self) -> EmbeddingRequest:
        inp = self.input
        if isinstance(inp, list):
            if not inp:
                raise UnsupportedParameter("input", "input must not be empty")
            if not all(isinstance(x, str) for x in inp):
                raise UnsupportedParameter(
                    "input", "token-id input is not supported for embeddings; send text"
                )
            if len(inp) > 2048:
                raise UnsupportedParameter("input", "at most 2048 inputs per request")
        return self

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]


# -- responses -------------------------------------------------------------------------------


class _Out(BaseModel):
    """Response models: built by Freehold, so no validation of their own fields is needed."""


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int | None = None) -> Usage:
        details = None if cached is None else PromptTokensDetails(cached_tokens=cached)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=details,
        )

    @classmethod
    def of_generation(cls, gen: Generation) -> Usage:
        return cls.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)


class FunctionCall(_Out):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TopLogprobOut(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(_Out):
    content: list[TokenLogprobOut]
    refusal: None = None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Out):
    """The legacy completions shape: parallel lists per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class Completion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[CompletionChoice]
    usage: Usage


class EmbeddingData(_Out):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Out):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "freehold"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
