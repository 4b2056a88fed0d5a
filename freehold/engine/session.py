"""One-user helpers on top of the Engine, for the `run` and `chat` commands."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from freehold.engine.chat_template import ChatTemplateError, Message, template_source
from freehold.engine.devices import GpuLayers
from freehold.engine.sampling import SamplingParams
from freehold.engine.scheduler import Engine, EngineConfig
from freehold.engine.types import Completion, RequestHandle
from freehold.vault import resolve_model_spec

if TYPE_CHECKING:
    from freehold.config import Paths


def open_engine(
    ref: str,
    *,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    n_slots: int = 1,
    chat_template: str | None = None,
    home: Paths | None = None,
    gpu_layers: GpuLayers = "auto",
) -> Engine:
    """Load a vault name (in `home`), .gguf path or BASE+ADAPTER for a single user (one slot by
    default).

    `chat_template` is a built-in NAME or a Jinja FILE that replaces the model's own template;
    `gpu_layers` is `--gpu-layers` (the engine's `offload` says what it chose).
    """
    # Resolved first, so a bad name fails before the weights load.
    source = template_source(chat_template) if chat_template is not None else None
    spec = resolve_model_spec(ref, home)
    cfg = EngineConfig(
        n_slots=n_slots,
        n_ctx_per_slot=n_ctx,
        n_threads=n_threads,
        adapters=tuple(str(a) for a in spec.adapters),
        chat_template=source,
        gpu_layers=gpu_layers,
    )
    return Engine(spec.path, cfg, name=ref)


def submit_prompt(
    engine: Engine,
    prompt: str,
    params: SamplingParams,
    *,
    system: str | None = None,
    raw: bool = False,
) -> RequestHandle:
    """A plain completion when `raw`, else one chat turn rendered with the model's template."""
    if raw:
        text = f"{system}\n\n{prompt}" if system else prompt
        return engine.submit(text, params)
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return engine.chat(messages, params)


def completion_json(model: str, c: Completion, seed: int | None = None) -> dict[str, Any]:
    """The structured result `freehold run --json` prints."""
    return {
        "model": model,
        "text": c.text,
        "finish_reason": c.finish_reason,
        "usage": {**asdict(c.usage), "total_tokens": c.usage.total_tokens},
        "timings": asdict(c.timings),
        "seed": seed,
    }


class ChatSession:
    """A conversation with history; `send` streams the reply, `commit` records it."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None) -> None:
        if engine.chat_template is None:
            # Fail before the first turn, not after the user typed it.
            engine.render_chat([{"role": "user", "content": ""}])
            raise ChatTemplateError(f"model {engine.name} cannot chat")  # pragma: no cover
        self.engine = engine
        self.params = params
        self.system = system
        self.history: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str) -> RequestHandle:
        self.history.append({"role": "user", "content": text})
        return self.engine.chat(self.history, self.params)

    def commit(self, reply: str) -> None:
        self.history.append({"role": "assistant", "content": reply})

    def rollback(self) -> None:
        """Forget the last user turn (its reply failed or was interrupted)."""
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()
