"""Ollama's API: request and response models (pydantic), and each generation request's
conversion to engine parameters (`to_sampling_params`).

Requests are strict: a field or option Ollama does not define is refused with 400 naming it.
Ollama's fields that Freehold cannot honour are declared only so that a value that would change
the output is refused with a 400 naming it; load-time settings that clients send by default
(threads, GPU layers, mmap...) are accepted and have no effect (docs/ollama.md has the table).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from freehold.engine import SamplingParams
from freehold.server.errors import UnsupportedParameter
from freehold.server.openai.protocol import FunctionDef

# Ollama's version this server speaks as. Clients gate features on it (VS Code Copilot's
# Ollama provider wants at least 0.6.4); 0.12.6 has every route and field served here.
OLLAMA_VERSION = "0.12.6"

_SEED_MOD = 2**32 - 1
_INT32_MAX = 2**31 - 1  # what llama.cpp's sampler takes
# A Go duration ("5m", "1h30m", "0s", "-1m"), Ollama's keep_alive string form.
_GO_DURATION = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- options -----------------------------------------------------------------------------------


class Options(_Strict):
    """Ollama's `options`. Honoured, ignored (no effect on output) or refused: see the docs."""

    # honoured
    num_predict: int | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=_INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=_INT32_MAX)
    # accepted, no effect: how a model is loaded or run, not what it outputs
    num_keep: int | None = None  # only matters when a context shifts; Freehold's never do
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    low_vram: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    numa: bool | None = None
    f16_kv: bool | None = None
    vocab_only: bool | None = None
    logits_all: bool | None = None
    embedding_only: bool | None = None
    # refused unless neutral: samplers Freehold's engine does not run
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    penalize_newline: bool | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise UnsupportedParameter("options.stop", "at most 16 stop strings")
        return v

    @model_validator(mode="after")
    def _neutral(self) -> Options:
        refused = {
            "mirostat": self.mirostat not in (None, 0),
            "typical_p": self.typical_p not in (None, 1.0),
            "tfs_z": self.tfs_z not in (None, 1.0),
            "penalize_newline": bool(self.penalize_newline),
        }
        for name, bad in refused.items():
            if bad:
                raise UnsupportedParameter(
                    f"options.{name}",
                    f"options.{name}={getattr(self, name)!r} cannot be honoured: Freehold's "
                    "sampler has no such setting (leave it unset)",
                )
        if self.num_predict == 0:
            raise UnsupportedParameter(
                "options.num_predict", "options.num_predict must be positive, or -1 for no limit"
            )
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's keep_alive as seconds (negative: forever; None: unset); ValueError if malformed."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    text = value.strip()
    try:
        return float(text)  # "0", "300": seconds
    except ValueError:
        pass
    if not _GO_DURATION.match(text):
        raise ValueError(f"keep_alive {value!r} is not a duration such as '5m', '1h' or '0'")
    sign = -1.0 if text.startswith("-") else 1.0
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", text)
    return sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)


class _KeepAlive(_Strict):
    """keep_alive: 0 unloads the model after the request; other values change nothing (served
    models stay loaded)."""

    keep_alive: float | str | None = None

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: float | str | None) -> float | str | None:
        try:
            keep_alive_seconds(v)
        except ValueError as e:
            raise UnsupportedParameter("keep_alive", str(e)) from None
        return v

    @property
    def unload_after(self) -> bool:
        return keep_alive_seconds(self.keep_alive) == 0


class GenerationFields(_KeepAlive):
    """Fields /api/chat and /api/generate share."""

    model: str = Field(min_length=1)
    stream: bool | None = None  # unset: stream, as Ollama does
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    think: bool | str | None = None  # accepted; Freehold does not split out reasoning text
    truncate: bool | None = None  # accepted; Freehold never truncates a prompt (400 instead)
    shift: bool | None = None  # accepted; Freehold never shifts a full context (it stops)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, str) and v not in ("", "json"):
            raise UnsupportedParameter("format", 'format must be "json" or a JSON schema object')
        return v

    @model_validator(mode="after")
    def _top_logprobs(self) -> GenerationFields:
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedParameter("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @property
    def streaming(self) -> bool:
        return self.stream is not False

    @property
    def num_ctx(self) -> int | None:
        return self.options.num_ctx if self.options else None

    def constraint(self) -> dict[str, Any]:
        if self.format == "json":
            return {"json_mode": True}
        if isinstance(self.format, dict):
            return {"json_schema": self.format} if self.format else {"json_mode": True}
        return {}

    def to_sampling_params(self, n_ctx: int) -> SamplingParams:
        """Engine parameters; unset options keep the engine's (llama.cpp's) defaults.
        `n_ctx`: the loaded context, for repeat_last_n=-1 ("the whole context")."""
        o = self.options or Options()
        d = SamplingParams()
        predict = o.num_predict
        last_n = d.penalty_last_n if o.repeat_last_n is None else o.repeat_last_n
        return SamplingParams(
            max_tokens=None if predict is None or predict < 0 else predict,
            temperature=d.temperature if o.temperature is None else o.temperature,
            top_p=d.top_p if o.top_p is None else o.top_p,
            top_k=d.top_k if o.top_k is None else o.top_k,
            min_p=d.min_p if o.min_p is None else o.min_p,
            repeat_penalty=d.repeat_penalty if o.repeat_penalty is None else o.repeat_penalty,
            presence_penalty=o.presence_penalty or 0.0,
            frequency_penalty=o.frequency_penalty or 0.0,
            penalty_last_n=n_ctx if last_n < 0 else last_n,
            seed=None if o.seed is None or o.seed < 0 else o.seed % _SEED_MOD,
            stop=o.stops,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
            **self.constraint(),
        )


# -- /api/chat ---------------------------------------------------------------------------------


class ToolCallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    index: int | None = None


class ToolCall(_Strict):
    function: ToolCallFunction
    id: str | None = None
    type: Literal["function"] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


def _no_images(images: list[str] | None, where: str) -> None:
    if images:
        raise UnsupportedParameter(
            where, "images are not supported: Freehold serves text models (send text only)"
        )


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None  # an earlier turn's reasoning: dropped

    @model_validator(mode="after")
    def _text_only(self) -> Message:
        _no_images(self.images, "messages.images")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (transformers' field names)."""
        m: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            m["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in self.tool_calls
            ]
        if self.tool_name:
            m["name"] = self.tool_name
        if self.tool_call_id:
            m["tool_call_id"] = self.tool_call_id
        return m


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None

    @property
    def tools_active(self) -> bool:
        return bool(self.tools)

    @property
    def tool_names(self) -> frozenset[str]:
        """The tools a reply may call."""
        return frozenset(t.function.name for t in self.tools or [])

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


# -- /api/generate -----------------------------------------------------------------------------


class GenerateRequest(GenerationFields):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        _no_images(self.images, "images")
        if self.template:
            raise UnsupportedParameter(
                "template",
                "template cannot be honoured: Freehold renders prompts with the model's Jinja "
                "chat template (choose another with `freehold serve --chat-template`), or send "
                "raw: true",
            )
        if self.raw and self.system:
            raise UnsupportedParameter("system", "a raw prompt has no place for a system prompt")
        if self.suffix and (self.system or self.raw):
            raise UnsupportedParameter(
                "suffix", "suffix (fill-in-the-middle) cannot be combined with system or raw"
            )
        if self.context and self.suffix:
            raise UnsupportedParameter("context", "context cannot be combined with suffix")
        return self

    @property
    def loads_only(self) -> bool:
        """No prompt: Ollama's way to load (or, with keep_alive 0, unload) a model."""
        return not self.prompt and not self.suffix


# -- embeddings --------------------------------------------------------------------------------


class EmbedRequest(_KeepAlive):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(default_factory=list)
    truncate: bool | None = None  # accepted; an input over the context is a 400, never cut
    dimensions: int | None = Field(default=None, ge=1)
    options: Options | None = None

    @field_validator("input")
    @classmethod
    def _bounded(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) > 2048:
            raise UnsupportedParameter("input", "at most 2048 inputs per request")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingsRequest(_KeepAlive):
    """The older /api/embeddings: one prompt, one vector."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    options: Options | None = None


# -- models ------------------------------------------------------------------------------------


class _Named(_Strict):
    """Ollama takes `model`, or `name` from older clients."""

    model: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _named(self) -> _Named:
        if not (self.model or self.name):
            raise UnsupportedParameter("model", "model is required")
        return self

    @property
    def ref(self) -> str:
        return self.model or self.name or ""


class ShowRequest(_Named):
    verbose: bool | None = None  # accepted: model_info never carries vocabularies
    system: str | None = None
    template: str | None = None
    options: Options | None = None


class PullRequest(_Named):
    stream: bool | None = None
    insecure: bool | None = None  # accepted: Freehold pulls from this machine only
    username: str | None = None
    password: str | None = None

    @model_validator(mode="after")
    def _no_credentials(self) -> PullRequest:
        if self.username or self.password:
            raise UnsupportedParameter(
                "username", "registry credentials are not used: Freehold pulls from this machine"
            )
        return self


# -- responses ---------------------------------------------------------------------------------


class _Out(BaseModel):
    """Response models: built by Freehold, serialised without their unset (None) fields."""

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class Details(_Out):
    parent_model: str = ""
    format: str = "gguf"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OutFunction(_Out):
    index: int
    name: str
    arguments: dict[str, Any]


class OutToolCall(_Out):
    id: str
    function: OutFunction


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class Logprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OutToolCall] | None = None


class Stats(_Out):
    """The final line's counts; durations in nanoseconds, as Ollama reports them."""

    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class ChatResponse(_Out):
    model: str
    created_at: str
    message: AssistantMessage
    done: bool = True
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None


class GenerateResponse(_Out):
    model: str
    created_at: str
    response: str
    done: bool = True
    done_reason: str | None = None
    context: list[int] | None = None
    logprobs: list[Logprob] | None = None


class EmbedResponse(_Out):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(_Out):
    embedding: list[float]


class ListedModel(_Out):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class TagsResponse(_Out):
    models: list[ListedModel]


class ShowResponse(_Out):
    license: str
    modelfile: str
    parameters: str
    template: str
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class RunningModel(_Out):
    name: str
    model: str
    size: int
    digest: str
    details: Details
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(_Out):
    models: list[RunningModel]


class VersionResponse(_Out):
    version: str = OLLAMA_VERSION


class Progress(_Out):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
