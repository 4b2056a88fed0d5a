"""Anthropic's streamed message: named server-sent events (`event: NAME\\ndata: {json}\\n\\n`).

    message_start, then per block content_block_start / content_block_delta... /
    content_block_stop (indices 0, 1, 2...), then message_delta (stop reason, final usage) and
    message_stop; `ping` while nothing else comes; `error` if it fails after the status line.

A text delta is built from pre-rendered fragments: one `json.dumps` of its text per token.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from freehold.server.anthropic.errors import error_body
from freehold.server.anthropic.protocol import Usage

if TYPE_CHECKING:
    from freehold.server.anthropic.protocol import ToolUseOut
    from freehold.server.errors import APIError
    from freehold.server.generation import Generation


def sse(name: str, obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n".encode()


PING = sse("ping", {"type": "ping"})


class MessageEvents:
    """The events of one streamed message; tracks which content block is open."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self.index = -1  # the last block started
        self.open: str | None = None  # the type of the block still open
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def start(self, input_tokens: int) -> bytes:
        """message_start: the prompt's size is known at once; how much of it came from the
        prefix cache only at the end (message_delta carries the split)."""
        usage = Usage(input_tokens=input_tokens, output_tokens=0).model_dump()
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return sse("message_start", {"type": "message_start", "message": message})

    def _begin(self, block: dict[str, Any]) -> bytes:
        out = self.close()
        self.index += 1
        self.open = block["type"]
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return out + sse("content_block_start", start)

    def close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def text(self, text: str) -> bytes:
        out = b"" if self.open == "text" else self._begin({"type": "text", "text": ""})
        return out + (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
            + str(self.index).encode()
            + b',"delta":{"type":"text_delta","text":'
            + json.dumps(text, ensure_ascii=False).encode()
            + b"}}\n\n"
        )

    def tool_use(self, use: ToolUseOut) -> bytes:
        """One whole tool_use block: its input arrives as one input_json_delta."""
        out = self._begin({"type": "tool_use", "id": use.id, "name": use.name, "input": {}})
        delta = {"type": "input_json_delta", "partial_json": use.input_json}
        out += sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": self.index, "delta": delta},
        )
        return out + self.close()

    def end(self, stop_reason: str, stop_sequence: str | None) -> bytes:
        self.stop_reason = stop_reason
        self.stop_sequence = stop_sequence
        return self.close()

    def tail(self, gen: Generation) -> bytes:
        """After accounting: the stop reason and the final usage, then message_stop."""
        usage = Usage.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens)
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        body = {"type": "message_delta", "delta": delta, "usage": usage.model_dump()}
        return sse("message_delta", body) + sse("message_stop", {"type": "message_stop"})

    def error(self, err: APIError) -> bytes:
        """A failure after the stream started (its 200 is long sent)."""
        return sse("error", error_body(err).model_dump())
