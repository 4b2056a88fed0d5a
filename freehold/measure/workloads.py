"""Conversations as load: many users, each a chain of turns with a growing history.

Two workloads besides `random` (fresh prompts, no shared prefix), both over /v1/chat/completions:
- multi-turn: users chat in parallel; a shared system prompt, then every turn re-sends the whole
  conversation so far, the server's own earlier replies included, as a chat client does;
- agent: as multi-turn, after a long fixed prefix that reads like tool definitions (JSON-schema
  function descriptions, as text in the system message: no `tools` array, so the server streams
  plain text rather than parsing tool calls).

The user side of a run (every system prompt and user message) comes from the seed alone, so two
servers get the same script and can be compared side by side; only the replies differ, and they
are what each server said. Building the script is pure; running it is `run_conversations`, one
server and one round, for benchmark scripts that interleave rounds with seeds.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np

from freehold.errors import InvalidInput
from freehold.measure import loadgen
from freehold.measure.loadgen import Level, OnDone, Prompt, Target
from freehold.measure.serving_stats import RequestRecord, summarize

WORKLOADS = ("random", "multi-turn", "agent")
_DEFAULTS: dict[str, dict[str, int]] = {
    "multi-turn": {"users": 8, "turns": 4, "prefix_len": 300, "input_len": 32, "output_len": 64},
    "agent": {"users": 4, "turns": 8, "prefix_len": 4000, "input_len": 32, "output_len": 32},
}
# Seed streams: each piece of text has its own, so a piece's words do not depend on the sizes
# of the others (calibration may size them differently on another server).
_SYSTEM, _MESSAGE, _TOOLS, _PROBE = 1, 2, 3, 4
# Every tool takes 26 words: a two-word name, three parameters of a name and three words, and a
# 12-word description. One shape keeps tokens per word steady, so a probe of a few whole tools
# sizes 4,000 tokens of them.
_TOOL_WORDS = 26
# Probe sizes in words, each pair from one stream of text, so the slope is the tokens of the words
# between them. Small enough for a 1k-token context; tool text takes ~4 tokens a word.
_MESSAGE_PROBES, _TOOL_PROBES = (32, 256), (_TOOL_WORDS, 6 * _TOOL_WORDS)
_PARAM_TYPES = ("string", "integer", "boolean", "number")


@dataclass(frozen=True)
class WorkloadSpec:
    """What a multi-turn run asks: sizes in tokens (words with --no-calibrate)."""

    kind: str
    users: int
    turns: int
    prefix_len: int  # the shared system prompt (multi-turn) or tool definitions (agent)
    input_len: int  # every user message
    output_len: int  # tokens asked for every reply

    @classmethod
    def of(cls, kind: str, **sizes: int | None) -> WorkloadSpec:
        """`kind`'s defaults, overridden by the sizes given (None: the default)."""
        if kind not in _DEFAULTS:
            raise InvalidInput(f"--workload must be one of {', '.join(WORKLOADS)}, not {kind!r}")
        unknown = set(sizes) - set(_DEFAULTS[kind])
        if unknown:
            raise TypeError(f"unknown workload sizes: {sorted(unknown)}")
        values = {k: v if sizes.get(k) is None else sizes[k] for k, v in _DEFAULTS[kind].items()}
        for key, value in values.items():
            least = 0 if key == "prefix_len" else 1
            if not isinstance(value, int) or value < least:
                flag = "--" + key.replace("_", "-")
                raise InvalidInput(f"{flag} must be a whole number, at least {least}: got {value}")
        return cls(kind, **values)

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.users} users x {self.turns} turns"


@dataclass(frozen=True)
class Sizing:
    """How many corpus words make each piece of text, after calibration on a server."""

    prefix_words: int
    message_words: int

    @classmethod
    def uncalibrated(cls, spec: WorkloadSpec) -> Sizing:
        """One word a token: for servers that report no token counts (--no-calibrate)."""
        return cls(spec.prefix_len, spec.input_len)


@dataclass(frozen=True)
class Script:
    """The user side of a whole run: a shared system prompt and each user's messages."""

    spec: WorkloadSpec
    system: str
    messages: tuple[tuple[str, ...], ...]  # [user][turn - 1]


@dataclass
class Conversation:
    """One user's chat as a client keeps it: each turn sends everything so far, the replies
    the server gave included, plus the new message."""

    system: str
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system and not self.history:
            self.history.append({"role": "system", "content": self.system})

    def ask(self, text: str) -> list[dict[str, str]]:
        """The messages to send for a turn whose user message is `text`."""
        self.history.append({"role": "user", "content": text})
        return [dict(m) for m in self.history]

    def answer(self, reply: str) -> None:
        """Keep the server's reply, as the next turn re-sends it."""
        self.history.append({"role": "assistant", "content": reply})


# ---- the script -----------------------------------------------------------------------------


def _words(key: list[int], n: int) -> list[str]:
    vocab = loadgen.vocabulary()
    rng = np.random.default_rng(key)
    return [vocab[i] for i in rng.integers(0, len(vocab), size=n)]


def tool_definitions(n_words: int, seed: int) -> str:
    """Text that reads like an agent's tool definitions, one JSON function schema a line, made
    of exactly `n_words` corpus words in names, parameter names and descriptions."""
    if n_words <= 0:
        return ""
    rng = np.random.default_rng([seed, _TOOLS])
    words = _words([seed, _TOOLS, 0], n_words)
    # n words are the first n of a longer text's words, so its tools are a prefix of the longer
    # text's (the last one cut short): what calibration relies on.
    tools = [_tool(words[i : i + _TOOL_WORDS], rng) for i in range(0, n_words, _TOOL_WORDS)]
    return "You can call these tools; reply with a call when one fits.\n" + "\n".join(
        json.dumps(t) for t in tools
    )


def _tool(words: list[str], rng: np.random.Generator) -> dict[str, Any]:
    name, rest = "_".join(words[:2]), words[2:]
    params: dict[str, dict[str, str]] = {}
    for p in range(min(3, len(rest) // 6)):
        key = rest[0] if rest[0] not in params else f"{rest[0]}_{p}"
        kind = _PARAM_TYPES[int(rng.integers(0, len(_PARAM_TYPES)))]
        params[key] = {"type": kind, "description": " ".join(rest[1:4])}
        rest = rest[4:]
    schema = {"type": "object", "properties": params, "required": list(params)[:1]}
    return {
        "type": "function",
        "function": {"name": name, "description": " ".join(rest), "parameters": schema},
    }


def system_prompt(spec: WorkloadSpec, words: int, seed: int) -> str:
    """The prefix every user shares: plain words (multi-turn) or tool definitions (agent)."""
    if spec.kind == "agent":
        return tool_definitions(words, seed)
    return " ".join(_words([seed, _SYSTEM], words))


def build_script(spec: WorkloadSpec, seed: int, sizing: Sizing) -> Script:
    """Every user's messages for every turn, from the seed alone: the same for every server."""
    messages = tuple(
        tuple(
            " ".join(_words([seed, _MESSAGE, u, t], sizing.message_words))
            for t in range(1, spec.turns + 1)
        )
        for u in range(spec.users)
    )
    return Script(spec, system_prompt(spec, sizing.prefix_words, seed), messages)


def endpoint_for(
    workload: str,
    endpoint: str | None,
    num_prompts: int | None,
    conversations: dict[str, int | None],
) -> str:
    """The endpoint `bench --url` talks to (conversations exist only as chat); refuses flags that
    do not fit the workload."""
    if workload not in WORKLOADS:
        raise InvalidInput(f"--workload must be one of {', '.join(WORKLOADS)}, not {workload!r}")
    given = [flag for flag, value in conversations.items() if value is not None]
    if workload == "random":
        if given:
            raise InvalidInput(f"{', '.join(given)}: only for --workload multi-turn or agent")
        return endpoint or "completions"
    if endpoint not in (None, "chat"):
        raise InvalidInput(
            f"--workload {workload} sends conversations to /v1/chat/completions: "
            f"drop --endpoint {endpoint}"
        )
    if num_prompts is not None:
        raise InvalidInput(
            f"--workload {workload} sends --users x --turns requests: drop --num-prompts"
        )
    return "chat"


# ---- calibration ----------------------------------------------------------------------------


def chat_target(target: Target) -> Target:
    """Conversations only make sense as chat: the same target, on /v1/chat/completions."""
    return replace(target, endpoint="chat")


def _words_for(tokens: int, tokens_per_word: float) -> int:
    if tokens == 0:
        return 0
    if tokens_per_word <= 0:  # a server whose counts do not grow with the text: words as tokens
        return tokens
    return max(1, round(tokens / tokens_per_word))


async def calibrate(target: Target, spec: WorkloadSpec, seed: int = 0) -> Sizing:
    """Words per piece so that each piece is the asked number of tokens on this server, from
    its own counts. Probes use text no script contains, so they warm no cache for the run."""
    target = chat_target(target)

    def message(k: int) -> Prompt:
        text = " ".join(_words([seed, _PROBE], k))
        return Prompt(1, messages=[{"role": "user", "content": text}])

    def tools(k: int) -> Prompt:
        system = {"role": "system", "content": tool_definitions(k, seed + 10_000)}
        return Prompt(1, messages=[system, {"role": "user", "content": "ok"}])

    async with loadgen.http_client(target) as client:
        _, per_word = await loadgen.fit_tokens(client, target, message, _MESSAGE_PROBES)
        per_tool_word = per_word
        if spec.kind == "agent" and spec.prefix_len:
            _, per_tool_word = await loadgen.fit_tokens(client, target, tools, _TOOL_PROBES)
    return Sizing(_words_for(spec.prefix_len, per_tool_word), _words_for(spec.input_len, per_word))


# ---- running it -----------------------------------------------------------------------------


async def _converse(
    client: httpx.AsyncClient,
    target: Target,
    script: Script,
    user: int,
    t0: float,
    on_done: OnDone | None,
) -> list[RequestRecord]:
    """One user's turns in order, each sent as soon as the last reply has ended."""
    conv = Conversation(script.system)
    records: list[RequestRecord] = []
    turns = script.spec.turns
    for turn, text in enumerate(script.messages[user], start=1):
        index = user * turns + turn - 1
        if records and not records[-1].success:
            # Without the reply there is no history to send: the rest of the chat is lost.
            rec = RequestRecord(index, error=f"not sent: turn {turn - 1} of this chat failed")
        else:
            reply: list[str] = []
            prompt = Prompt(script.spec.output_len, messages=conv.ask(text))
            rec = await loadgen.send_request(client, target, prompt, index, t0, reply)
            conv.answer("".join(reply))
        rec.user, rec.turn = user, turn
        records.append(rec)
        if on_done:
            on_done(rec)
    return records


async def _run(
    target: Target, script: Script, on_done: OnDone | None
) -> tuple[list[RequestRecord], float]:
    async with loadgen.http_client(target) as client:
        await loadgen.warm_up(client, target)
        t0 = time.perf_counter()
        chats = await asyncio.gather(
            *(_converse(client, target, script, u, t0, on_done) for u in range(script.spec.users))
        )
        duration = time.perf_counter() - t0
    return sorted((r for chat in chats for r in chat), key=lambda r: r.index), duration


def run_script(
    target: Target,
    script: Script,
    *,
    slo: dict[str, float] | None = None,
    on_done: OnDone | None = None,
) -> Level:
    """Every user's conversation at once, each a chain of turns; one level of results."""
    target = chat_target(target)
    records, duration = asyncio.run(_run(target, script, on_done))
    spec = script.spec
    summary = summarize(records, duration, label=spec.label, concurrency=spec.users, slo=slo)
    return Level(summary, records)


def run_conversations(
    target: Target,
    spec: WorkloadSpec,
    seed: int = 0,
    *,
    calibrate_sizes: bool = True,
    slo: dict[str, float] | None = None,
    on_done: OnDone | None = None,
) -> Level:
    """One round of a workload against one server: calibrate sizes, build the script from the
    seed, run it. A benchmark comparing servers calls this per server and per round."""
    loadgen.check_target(target)
    sizing = asyncio.run(calibrate(target, spec, seed)) if calibrate_sizes else None
    script = build_script(spec, seed, sizing or Sizing.uncalibrated(spec))
    return run_script(target, script, slo=slo, on_done=on_done)
