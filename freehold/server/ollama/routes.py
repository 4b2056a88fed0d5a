"""POST /api/chat and /api/generate: Ollama's generation routes over the shared service.

Streams NDJSON by default (one JSON object a line, `application/x-ndjson`), as Ollama does; the
final line has `done: true`, `done_reason` and the counts and durations (nanoseconds). A request
with no messages (chat) or no prompt (generate) only loads the model, or with `keep_alive: 0`
unloads it, as Ollama's clients use them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import llama_cpp as ll
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from freehold.engine import (
    Delta,
    Engine,
    ReplySplitter,
    TokenLogprob,
    ToolCall,
    split_reply,
)
from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.generation import (
    Generation,
    GenerationRequest,
    GenerationService,
    Job,
    generation_service,
)
from freehold.server.ollama.facts import now_rfc3339, served_id
from freehold.server.ollama.http import NDJSON, JSONBodyRoute, line
from freehold.server.ollama.loading import (
    loaded_engine,
    unload_before_last_line,
    unload_when_idle,
    wait_loaded,
)
from freehold.server.ollama.protocol import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationFields,
    Logprob,
    OutFunction,
    OutToolCall,
    Stats,
    TopLogprob,
)

router = APIRouter(route_class=JSONBodyRoute)

Kind = Literal["chat", "generate"]


# -- the pieces of a reply ---------------------------------------------------------------------


def logprobs_out(lps: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[Logprob]:
    return [
        Logprob(
            token=lp.text,
            logprob=lp.logprob,
            bytes=list(lp.text.encode()),
            top_logprobs=[
                TopLogprob(token=t.text, logprob=t.logprob, bytes=list(t.text.encode()))
                for t in lp.top
            ],
        )
        for lp in lps
    ]


def tool_calls_out(calls: list[ToolCall]) -> list[OutToolCall]:
    """Calls found by `split_reply` with their arguments as objects, as Ollama returns them."""
    return [
        OutToolCall(
            id=c.id,
            function=OutFunction(index=i, name=c.name, arguments=json.loads(c.arguments)),
        )
        for i, c in enumerate(calls)
    ]


def stats(gen: Generation, started: float, load_s: float) -> Stats:
    """The final line's counts and durations, from the engine's own timings."""
    f = gen.choices[0].finished
    assert f is not None
    t = f.timings

    def ns(seconds: float) -> int:
        return max(0, int(seconds * 1e9))

    return Stats(
        total_duration=ns(time.perf_counter() - started),
        load_duration=ns(load_s),
        prompt_eval_count=gen.prompt_tokens,
        prompt_eval_duration=ns(t.ttft_s - t.queued_s),
        eval_count=gen.completion_tokens,
        eval_duration=ns(t.total_s - t.ttft_s),
    )


class Lines:
    """The NDJSON lines of one streamed reply. Per-token lines are built from pre-rendered
    fragments: one `json.dumps` of the new text, not of a whole object."""

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind = kind
        self.model = model
        self._model = json.dumps(model, ensure_ascii=False)
        self.last: list[bytes] = []  # the final line, once made (see unload_before_last_line)

    def _head(self) -> str:
        return f'{{"model":{self._model},"created_at":"{now_rfc3339()}",'

    def text(self, text: str, logprobs: list[Logprob] | None = None) -> bytes:
        t = json.dumps(text, ensure_ascii=False)
        body = (
            f'"message":{{"role":"assistant","content":{t}}}'
            if self.kind == "chat"
            else f'"response":{t}'
        )
        if logprobs:
            lps = json.dumps([lp.dump() for lp in logprobs], ensure_ascii=False)
            body += f',"logprobs":{lps}'
        return f'{self._head()}{body},"done":false}}\n'.encode()

    def message(
        self, content: str, calls: list[OutToolCall], logprobs: list[Logprob] | None
    ) -> bytes:
        """The end of a reply held back (tools were offered) in one line: the last content
        and/or the tool calls."""
        msg = AssistantMessage(content=content, tool_calls=calls or None)
        obj: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339()}
        obj["message"] = msg.dump()
        if logprobs:
            obj["logprobs"] = [lp.dump() for lp in logprobs]
        obj["done"] = False
        return line(obj)

    def final(self, done_reason: str, st: Stats, context: list[int] | None = None) -> bytes:
        obj: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339()}
        if self.kind == "chat":
            obj["message"] = AssistantMessage(content="").dump()
        else:
            obj["response"] = ""
        obj.update(done=True, done_reason=done_reason)
        if context is not None:
            obj["context"] = context
        obj.update(st.dump())
        out = line(obj)
        self.last[:] = [out]
        return out

    @staticmethod
    def error(err: APIError) -> bytes:
        """A failure after the stream started (the 200 is long sent): an error line."""
        return line({"error": err.message})


# -- shared steps ------------------------------------------------------------------------------


async def _engine_for(
    service: GenerationService, request: Request, key: ApiKey | None, endpoint: str, mid: str
) -> tuple[Engine, float]:
    """The loaded engine for a request this key may make, waiting for a load; seconds waited.

    Anything else (unknown model, a key without the right, draining, a failed load) goes to
    admission, which refuses it in the ledger and audit log like on every route."""
    s = service.services
    waited = await wait_loaded(s, key, mid)
    engine = loaded_engine(s, mid) if s.registry.known(mid) else None
    if engine is not None and not s.draining and (key is None or key.allows(mid)):
        return engine, waited
    _, ctx = await service.admit(request, key, endpoint=endpoint, model=mid, places=0)
    ctx.finish(503)  # admission let it through: the model came up after the wait gave up
    raise APIError(
        503,
        f"model {mid} is loading; retry shortly",
        code="model_loading",
        headers={"Retry-After": "2"},
    )


def _check_num_ctx(req: GenerationFields, engine: Engine) -> None:
    """num_ctx above the loaded context is refused: never a silently shorter context."""
    n = req.num_ctx
    if n is not None and n > engine.n_ctx_per_slot:
        raise APIError(
            400,
            f"options.num_ctx={n} is more than {engine.name} is loaded with "
            f"({engine.n_ctx_per_slot} tokens per request); send at most that, or restart the "
            "server with a larger --ctx",
            param="options.num_ctx",
        )


async def _load_only(
    service: GenerationService,
    request: Request,
    key: ApiKey | None,
    req: ChatRequest | GenerateRequest,
    endpoint: str,
    kind: Kind,
) -> Response:
    """No messages or prompt: load the model (or unload it with keep_alive 0), say done."""
    s = service.services
    mid = served_id(s, req.model)
    idle = s.registry.known(mid) and loaded_engine(s, mid) is None
    # Unloading a model that is not loaded: nothing to do (and nothing to load first).
    if not (req.unload_after and idle and (key is None or key.allows(mid))):
        if not req.unload_after:
            await wait_loaded(s, key, mid)
        _, ctx = await service.admit(request, key, endpoint=endpoint, model=mid, places=0)
        ctx.finish(200)
    reason = "load"
    if req.unload_after:
        await unload_when_idle(s, mid)
        reason = "unload"
    now = now_rfc3339()
    empty = AssistantMessage(content="")
    body = (
        ChatResponse(model=req.model, created_at=now, message=empty, done_reason=reason)
        if kind == "chat"
        else GenerateResponse(model=req.model, created_at=now, response="", done_reason=reason)
    ).dump()
    if req.streaming:
        return Response(line(body), media_type=NDJSON)
    return JSONResponse(body)


# -- /api/chat ---------------------------------------------------------------------------------


@router.post("/api/chat")
async def chat(
    req: ChatRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    started = time.perf_counter()
    if not req.messages:
        return await _load_only(service, request, key, req, "ollama.chat", "chat")
    s = service.services
    mid = served_id(s, req.model)
    engine, load_s = await _engine_for(service, request, key, "ollama.chat", mid)
    _check_num_ctx(req, engine)
    messages = req.template_messages()
    params = req.to_sampling_params(engine.n_ctx_per_slot)
    job = Job(params, messages=messages, tools=req.template_tools())
    gen = await service.start(
        request, key, GenerationRequest("ollama.chat", mid, [job], audit_prompt=messages)
    )
    if req.streaming:
        w = Lines("chat", req.model)

        def tail(g: Generation) -> bytes:
            return w.final(_done_reason(g), stats(g, started, load_s))

        resp = service.stream(
            gen, _chat_lines(gen, req, w), tail=tail, error=w.error, media_type=NDJSON
        )
        if req.unload_after:
            unload_before_last_line(resp, s, mid, w.last)
        return resp
    await service.collect(gen)
    body = {**_chat_reply(gen, req).dump(), **stats(gen, started, load_s).dump()}
    if req.unload_after:
        await unload_when_idle(s, mid)
    return JSONResponse(body)


def _done_reason(gen: Generation) -> str:
    f = gen.choices[0].finished
    return f.finish_reason if f is not None else "stop"


def _chat_reply(gen: Generation, req: ChatRequest) -> ChatResponse:
    c = gen.choices[0]
    content, calls = split_reply(c.output, req.tool_names)
    return ChatResponse(
        model=req.model,
        created_at=now_rfc3339(),
        message=AssistantMessage(content=content, tool_calls=tool_calls_out(calls) or None),
        done_reason=_done_reason(gen),
        logprobs=logprobs_out(c.logprobs) if req.logprobs else None,
    )


async def _chat_lines(gen: Generation, req: ChatRequest, w: Lines) -> AsyncIterator[bytes]:
    # With tools, text goes out as soon as it cannot be part of a call; what was held back
    # (the calls, and text that might have been one) is one line before the final one.
    split = ReplySplitter(req.tool_names)
    lps: list[TokenLogprob] = []  # logprobs wait with held text
    async for _, ev in gen.events():
        if isinstance(ev, Delta):
            shown = split.feed(ev.text) if ev.text else ""
            if req.logprobs:
                lps.extend(ev.logprobs)
            if shown or (lps and not split.tools):
                yield w.text(shown, logprobs_out(lps) if req.logprobs else None)
                lps.clear()
        elif ev.finish_reason in ("stop", "length"):
            rest, calls = split.finish()
            if rest or calls or lps:
                yield w.message(rest, tool_calls_out(calls), logprobs_out(lps) or None)


# -- /api/generate -----------------------------------------------------------------------------


def fim_tokens(model: Any) -> tuple[int, int, int] | None:
    """The model's fill-in-the-middle tokens (prefix, suffix, middle), if it has them."""
    ids = (
        ll.llama_vocab_fim_pre(model.vocab),
        ll.llama_vocab_fim_suf(model.vocab),
        ll.llama_vocab_fim_mid(model.vocab),
    )
    return ids if min(ids) >= 0 else None


def fim_prompt(
    bos: list[int], fim: tuple[int, int, int], prefix: list[int], suffix: list[int]
) -> list[int]:
    """llama.cpp's infill layout (prefix-suffix-middle): the model writes what comes between."""
    pre, suf, mid = fim
    return [*bos, pre, *prefix, suf, *suffix, mid]


def _bos(engine: Engine) -> list[int]:
    return [engine.model.bos_id] if engine.model.add_bos else []


def generate_prompt(req: GenerateRequest, engine: Engine) -> tuple[list[int], bool]:
    """The prompt's token ids, and whether it went through the chat template (then its tokens
    plus the reply's are returned as `context`, as Ollama does)."""
    prompt = req.prompt or ""
    if req.suffix:
        fim = fim_tokens(engine.model)
        if fim is None:
            raise APIError(
                400,
                f"suffix (fill-in-the-middle) needs a model with FIM tokens; {engine.name} has "
                "none. Send the prompt without a suffix, or serve a code model that has them",
                param="suffix",
            )
        pre = engine.tokenize(prompt, add_special=False)
        return fim_prompt(
            _bos(engine), fim, pre, engine.tokenize(req.suffix, add_special=False)
        ), False
    context = list(req.context or [])
    templated = not req.raw and engine.chat_template is not None
    if templated:
        messages = [{"role": "system", "content": req.system}] if req.system else []
        text = engine.render_chat([*messages, {"role": "user", "content": prompt}])
    elif req.system:
        raise APIError(
            400,
            f"{engine.name} has no chat template to place a system prompt in; send raw: true "
            "with the whole prompt, or serve it with --chat-template",
            param="system",
        )
    else:
        text = prompt
    bos = engine.model.token_text(engine.model.bos_id) if engine.model.add_bos else ""
    # After earlier context, or when the text already starts with BOS, no second BOS.
    add_special = not context and not (bos and text.startswith(bos))
    return context + engine.tokenize(text, add_special=add_special), templated


@router.post("/api/generate")
async def generate(
    req: GenerateRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    started = time.perf_counter()
    if req.loads_only:
        return await _load_only(service, request, key, req, "ollama.generate", "generate")
    s = service.services
    mid = served_id(s, req.model)
    engine, load_s = await _engine_for(service, request, key, "ollama.generate", mid)
    _check_num_ctx(req, engine)
    tokens, templated = generate_prompt(req, engine)
    params = req.to_sampling_params(engine.n_ctx_per_slot)
    audit = {"prompt": req.prompt, "system": req.system, "suffix": req.suffix}
    job = Job(params, prompt=tokens, add_special=False)
    gen = await service.start(
        request, key, GenerationRequest("ollama.generate", mid, [job], audit_prompt=audit)
    )

    def context(g: Generation) -> list[int] | None:
        if not templated:
            return None
        return tokens + engine.tokenize(g.choices[0].output, add_special=False)

    if req.streaming:
        w = Lines("generate", req.model)

        def tail(g: Generation) -> bytes:
            return w.final(_done_reason(g), stats(g, started, load_s), context(g))

        resp = service.stream(
            gen, _generate_lines(gen, req, w), tail=tail, error=w.error, media_type=NDJSON
        )
        if req.unload_after:
            unload_before_last_line(resp, s, mid, w.last)
        return resp
    await service.collect(gen)
    c = gen.choices[0]
    reply = GenerateResponse(
        model=req.model,
        created_at=now_rfc3339(),
        response=c.output,
        done_reason=_done_reason(gen),
        context=context(gen),
        logprobs=logprobs_out(c.logprobs) if req.logprobs else None,
    )
    body = {**reply.dump(), **stats(gen, started, load_s).dump()}
    if req.unload_after:
        await unload_when_idle(s, mid)
    return JSONResponse(body)


async def _generate_lines(gen: Generation, req: GenerateRequest, w: Lines) -> AsyncIterator[bytes]:
    async for _, ev in gen.events():
        if isinstance(ev, Delta) and (ev.text or (req.logprobs and ev.logprobs)):
            yield w.text(ev.text, logprobs_out(ev.logprobs) if req.logprobs else None)
