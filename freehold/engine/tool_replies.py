"""Whether a model's reply is text or tool calls, decided while it streams.

With tools offered, a reply may be a call: a `<tool_call>{json}</tool_call>` block anywhere, or
a bare JSON call (an object or a list, possibly fenced) as the whole reply (see
`parse_tool_calls`). A stream cannot wait for the whole reply to know, or an agent shows nothing
until the end (Codex gives up: "idle timeout waiting for SSE"). So `ReplySplitter` releases text
as soon as it cannot be part of a call and holds the rest; `split_reply` runs the same splitter
over a whole reply, so every API, streamed or not, gets the same text and calls.

One rule for every API: the calls count only if each names an offered tool and its arguments
are a JSON object; otherwise the whole reply is text (a JSON answer with a "name" key is not a
call, and no API can pass on arguments that are not an object).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Literal

from freehold.engine.chat_template import ToolCall, parse_tool_calls

TAG = "<tool_call>"

# plain: no tools offered; start: the reply so far may open a bare JSON call (held);
# text: released as it comes; call: a call may have begun (a tag, or a JSON opening): held
Mode = Literal["plain", "start", "text", "call"]


class ReplySplitter:
    """Feed a reply's text as it is generated; `finish` gives what is left and the calls.

    `tools` are the names of the offered tools (none: the reply is text, as it comes).
    `parallel=False` keeps only the first call; `max_calls` caps their number.
    """

    def __init__(
        self, tools: Iterable[str] = (), *, parallel: bool = True, max_calls: int | None = None
    ) -> None:
        self.tools = frozenset(tools)
        self.max_calls = 1 if not parallel else max_calls
        self.released: list[str] = []  # the text shown so far
        self._held = ""
        self._mode: Mode = "start" if self.tools else "plain"

    def feed(self, piece: str) -> str:
        """Add generated text; return what can be shown now ('' while it is held back)."""
        if self._mode == "plain":
            return self._release(piece)
        self._held += piece
        if self._mode == "call":
            return ""
        if self._mode == "start":
            opens = _opens_call(self._held.lstrip())
            if opens is None:
                return ""
            if opens:
                self._mode = "call"
                return ""
            self._mode = "text"
        i = self._held.find(TAG)
        if i >= 0:
            self._mode = "call"
            safe = self._held[:i].rstrip()
        else:
            # Trailing whitespace waits too: it is dropped if a call follows.
            safe = self._held[: len(self._held) - _partial_tag(self._held)].rstrip()
        self._held = self._held[len(safe) :]
        return self._release(safe)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the reply: the text still to show, and the tool calls."""
        rest, self._held = self._held, ""
        if self._mode in ("plain", "text"):
            return self._release(rest), []
        content, calls = parse_tool_calls(rest)
        if not calls or not all(self._valid(c) for c in calls):
            return self._release(rest), []
        if self.max_calls is not None:
            calls = calls[: self.max_calls]
        if content and self.released:
            content = "\n\n" + content  # text before the calls, then text after them
        return self._release(content), calls

    @property
    def text(self) -> str:
        """All the text shown so far."""
        return "".join(self.released)

    def _valid(self, call: ToolCall) -> bool:
        if call.name not in self.tools:
            return False
        try:
            return isinstance(json.loads(call.arguments), dict)
        except json.JSONDecodeError:
            return False

    def _release(self, text: str) -> str:
        if text:
            self.released.append(text)
        return text


def split_reply(
    text: str, tools: Iterable[str] = (), *, parallel: bool = True, max_calls: int | None = None
) -> tuple[str, list[ToolCall]]:
    """A whole reply as (text, tool calls), exactly as a stream of it would show them."""
    s = ReplySplitter(tools, parallel=parallel, max_calls=max_calls)
    s.feed(text)
    _, calls = s.finish()
    return s.text, calls


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that could begin the tag."""
    for n in range(min(len(TAG) - 1, len(text)), 0, -1):
        if text.endswith(TAG[:n]):
            return n
    return 0


def _opens_call(s: str) -> bool | None:
    """Whether a reply beginning with `s` (no leading whitespace) opens like a bare JSON call:
    an optional ``` or ```json fence, an optional '[', then '{' and a key. None: too soon to
    tell. Once decided, no later text changes the answer, so a stream decides as a whole
    reply does."""
    if s.startswith("`"):
        if len(s) < 3:
            return None if "```".startswith(s) else False
        if not s.startswith("```"):
            return False
        s = s[3:]
        if s.startswith("json"):
            s = s[4:]
        elif "json".startswith(s):
            return None
        s = s.lstrip()
    if s.startswith("["):
        s = s[1:].lstrip()
    if not s:
        return None
    if s[0] != "{":
        return False
    s = s[1:].lstrip()
    return None if not s else s[0] == '"'
