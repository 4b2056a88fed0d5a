"""Freehold's inference engine: continuous batching over llama.cpp's low-level API.

Typical use (a server or the CLI)::

    engine = Engine("model.gguf", EngineConfig(n_slots=8))
    handle = engine.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))
    async for event in handle:          # or: for event in handle
        ...                             # Delta(text, tokens, logprobs) ... Finished(reason, usage)
    handle.cancel()                     # e.g. on client disconnect
"""

from freehold.engine.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    ToolCall,
    parse_tool_calls,
    template_source,
)
from freehold.engine.model import Model, ModelInfo, physical_cores
from freehold.engine.prompt_cache import CacheStats, PromptCache
from freehold.engine.residency import InsufficientMemory, ModelPool
from freehold.engine.sampling import SamplingParams, logit_bias_from_strings
from freehold.engine.scheduler import Engine, EngineConfig
from freehold.engine.tool_replies import ReplySplitter, split_reply
from freehold.engine.types import (
    Completion,
    ContextOverflow,
    Delta,
    EngineClosed,
    EngineStats,
    Event,
    Finished,
    FinishReason,
    QueueFull,
    RequestHandle,
    RequestTimeout,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "CacheStats",
    "ChatTemplate",
    "ChatTemplateError",
    "Completion",
    "ContextOverflow",
    "Delta",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineStats",
    "Event",
    "Finished",
    "FinishReason",
    "InsufficientMemory",
    "Model",
    "ModelInfo",
    "ModelPool",
    "PromptCache",
    "QueueFull",
    "ReplySplitter",
    "RequestHandle",
    "RequestTimeout",
    "SamplingParams",
    "Timings",
    "TokenLogprob",
    "ToolCall",
    "TopLogprob",
    "Usage",
    "logit_bias_from_strings",
    "parse_tool_calls",
    "physical_cores",
    "split_reply",
    "template_source",
]
