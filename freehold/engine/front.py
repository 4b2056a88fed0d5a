"""What every engine does before its scheduler: tokenize, render chat, and submit.

`Engine` (one llama.cpp context on this machine) and `ClusterEngine` (replicas on a Ray
cluster) share it, so a front door cannot tell them apart: both template and tokenize here,
with the model's own vocabulary, and differ only in where `submit` sends the tokens.
"""

from __future__ import annotations

from typing import Any

from freehold.engine.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    Message,
)
from freehold.engine.model import Model
from freehold.engine.sampling import SamplingParams
from freehold.engine.types import Completion, ContextOverflow, RequestHandle
from freehold.errors import InvalidInput


class EngineFront:
    """Tokenizing and chat templating over `self.model`; subclasses provide `submit`."""

    model: Model
    name: str
    n_ctx_per_slot: int
    chat_template_override: str | None = None  # template source in force instead of the model's
    _template: ChatTemplate | None = None
    _template_loaded: bool = False

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        add_special: bool = True,
    ) -> RequestHandle:
        raise NotImplementedError

    def _prepare(
        self, prompt: str | list[int], params: SamplingParams | None, add_special: bool
    ) -> tuple[list[int], SamplingParams]:
        """A request's prompt tokens and checked parameters, or the error that refuses it."""
        params = (params or SamplingParams()).validate()
        tokens = (
            self.tokenize(prompt, add_special=add_special)
            if isinstance(prompt, str)
            else list(prompt)
        )
        self._check_prompt(tokens)
        return tokens, params

    def _check_prompt(self, tokens: list[int]) -> None:
        if not tokens:
            raise InvalidInput("the prompt is empty; send at least one token of text")
        if len(tokens) >= self.n_ctx_per_slot:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx_per_slot} "
                f"(room is needed for at least one generated token); shorten the prompt or load "
                f"the model with a larger context"
            )
        bad = [t for t in tokens if not 0 <= t < self.model.n_vocab]
        if bad:
            raise InvalidInput(
                f"token id {bad[0]} is outside the vocabulary 0..{self.model.n_vocab - 1}"
            )

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        timeout: float | None = None,
        add_special: bool = True,
    ) -> Completion:
        """Submit and wait for the whole result."""
        return self.submit(prompt, params, add_special=add_special).result(timeout)

    @property
    def chat_template(self) -> ChatTemplate | None:
        if not self._template_loaded:
            src = self.chat_template_override or self.model.chat_template()
            if src is not None:
                self._template = ChatTemplate(
                    src,
                    bos_token=self.model.token_text(self.model.bos_id),
                    eos_token=self.model.token_text(self.model.eos_id),
                )
            self._template_loaded = True
        return self._template

    @property
    def chat_template_origin(self) -> str | None:
        """Whose template chat uses: "override" (EngineConfig.chat_template), "model", or None."""
        if self.chat_template_override:
            return "override"
        return "model" if self.model.chat_template() is not None else None

    def render_chat(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text the template in force (override, else the model's) makes of them."""
        tmpl = self.chat_template
        if tmpl is None:
            raise ChatTemplateError(
                f"model {self.name} has no chat template (it is a base model), so it cannot chat; "
                f"pass --chat-template NAME ({', '.join(BUILTIN_TEMPLATES)}) or send a plain "
                "completion instead (e.g. `freehold run --raw`)"
            )
        return tmpl.render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
        )

    def chat(
        self,
        messages: list[Message],
        params: SamplingParams | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> RequestHandle:
        """Render `messages` with the template in force and submit the completion."""
        return self.submit(self.chat_tokens(messages, tools=tools, **template_kwargs), params)

    def chat_tokens(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """The prompt tokens `chat` submits for `messages` (what a token-counting route counts)."""
        text = self.render_chat(messages, tools=tools, **template_kwargs)
        bos = self.model.token_text(self.model.bos_id) if self.model.add_bos else ""
        # Templates that write the BOS themselves must not get a second one from the tokenizer.
        add_special = not (bos and text.startswith(bos))
        return self.tokenize(text, add_special=add_special)
