"""Server-sent event framing exactly as OpenAI streams: `data: {chunk}\\n\\n` ... `data: [DONE]`.

Chunks are built from pre-rendered JSON fragments: a streamed token costs one `json.dumps` of
its text rather than serialising the whole chunk object, which matters at hundreds of
tokens per second on a small CPU.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from freehold.server.errors import APIError
from freehold.server.openai.protocol import Usage

if TYPE_CHECKING:
    from freehold.server.generation import Generation

DONE = b"data: [DONE]\n\n"


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ChunkWriter:
    """Chunks of one streamed response (chat.completion.chunk or text_completion)."""

    def __init__(
        self,
        kind: Literal["chat", "text"],
        response_id: str,
        created: int,
        model: str,
        *,
        include_usage: bool,
    ) -> None:
        self.kind = kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._head = (
            f'data: {{"id":{json.dumps(response_id)},"object":"{obj}","created":{created},'
            f'"model":{json.dumps(model)},"system_fingerprint":null,"choices":[{{"index":'
        )
        # With include_usage, OpenAI sends "usage": null on every chunk before the last.
        self._tail = ',"usage":null}\n\n' if include_usage else "}\n\n"
        self.include_usage = include_usage
        self.response_id = response_id
        self.created = created
        self.model = model

    def _choice(self, index: int, body: str) -> bytes:
        return f"{self._head}{index},{body}}}]{self._tail}".encode()

    def role(self, index: int) -> bytes:
        return self._choice(
            index, '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'
        )

    def text(self, index: int, text: str, logprobs: Any = None) -> bytes:
        lp = "null" if logprobs is None else json.dumps(logprobs, ensure_ascii=False)
        t = json.dumps(text, ensure_ascii=False)
        if self.kind == "chat":
            body = f'"delta":{{"content":{t}}},"logprobs":{lp},"finish_reason":null'
        else:
            body = f'"text":{t},"logprobs":{lp},"finish_reason":null'
        return self._choice(index, body)

    def tool_calls(self, index: int, calls: list[dict[str, Any]]) -> bytes:
        deltas = [{"index": i, **c} for i, c in enumerate(calls)]
        body = (
            f'"delta":{{"tool_calls":{json.dumps(deltas, ensure_ascii=False)}}},'
            '"logprobs":null,"finish_reason":null'
        )
        return self._choice(index, body)

    def finish(self, index: int, reason: str) -> bytes:
        if self.kind == "chat":
            body = f'"delta":{{}},"logprobs":null,"finish_reason":"{reason}"'
        else:
            body = f'"text":"","logprobs":null,"finish_reason":"{reason}"'
        return self._choice(index, body)

    def tail(self, gen: Generation) -> bytes:
        """After the last choice: the usage chunk when asked for, then [DONE]."""
        if not self.include_usage:
            return DONE
        return self.usage(Usage.of_generation(gen).model_dump()) + DONE

    def error(self, err: APIError) -> bytes:
        """A failure after the stream started (status 200 is long sent): an error event."""
        return b"data: " + json.dumps(err.body()).encode() + b"\n\n" + DONE

    def usage(self, usage: dict[str, Any]) -> bytes:
        return event(
            {
                "id": self.response_id,
                "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": None,
                "choices": [],
                "usage": usage,
            }
        )
