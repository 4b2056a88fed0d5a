"""POST /v1/responses, and GET / DELETE /v1/responses/{id} when responses are stored.

A thin door: the request becomes one chat job for the shared generation service; the reply is
rendered as a Response object, or streamed as Responses events (`event: NAME` and `data:`
JSON with a `sequence_number` counting from 0).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from freehold.engine import Delta, Finished, ReplySplitter, ToolCall, split_reply
from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError
from freehold.server.generation import (
    Generation,
    GenerationRequest,
    GenerationService,
    Job,
    generation_service,
    with_heartbeat,
)
from freehold.server.responses.protocol import (
    ITEMS,
    DeletedResponse,
    FunctionCallOut,
    IncompleteDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    template_messages,
)
from freehold.server.responses.store import BrokenChain, ResponseStore
from freehold.server.services import services

log = logging.getLogger(__name__)

IGNORED_TOOLS_HEADER = "x-freehold-ignored-tools"
HEARTBEAT_S = 15.0  # an SSE comment while a long prompt prefills keeps proxies from timing out
ENABLE_STORE = (
    "start the server with `freehold serve --store-responses` "
    '(or "store_responses": true in settings.json\'s "server" section)'
)


@asynccontextmanager
async def _store_lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        store = getattr(app.state, "responses_store", None)
        if store is not None:
            store.close()


router = APIRouter(lifespan=_store_lifespan)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def response_store(request: Request) -> ResponseStore | None:
    """The store when the server keeps responses (opened on first use), else None."""
    s = services(request)
    if not s.settings.store_responses:
        return None
    state = request.app.state
    if getattr(state, "responses_store", None) is None:
        state.responses_store = ResponseStore(s.settings.home.responses)
    return state.responses_store


def _owner(key: ApiKey | None) -> str:
    # With no keys configured, the server has one owner: everything it stores.
    return key.name if key is not None else ""


# -- POST /v1/responses ------------------------------------------------------------------------


def _history(store: ResponseStore | None, req: ResponseRequest, key: ApiKey | None) -> list[Any]:
    """The earlier conversation `previous_response_id` names, as input items."""
    prev = req.previous_response_id
    if prev is None:
        return []
    if store is None:
        raise APIError(
            400,
            "previous_response_id needs stored responses, and this server keeps none: "
            f"{ENABLE_STORE}, or send the whole conversation in 'input'",
            param="previous_response_id",
            code="responses_not_stored",
        )
    try:
        items = store.conversation(_owner(key), prev)
    except BrokenChain as e:
        raise APIError(400, str(e), param="previous_response_id") from None
    if items is None:
        raise APIError(
            400,
            f"no stored response {prev!r} (it was not stored, was deleted, or another key made it)",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    try:
        return ITEMS.validate_python(items)
    except ValidationError:  # written by an older Freehold, say; never a 500
        raise APIError(
            400, f"the stored conversation of {prev!r} cannot be read", param="previous_response_id"
        ) from None


def generation_request(req: ResponseRequest, history: list[Any]) -> GenerationRequest:
    messages = template_messages(req.instructions, history + req.input_items())
    job = Job(req.to_sampling_params(), messages=messages, tools=req.template_tools())
    return GenerationRequest("responses", req.model, [job], user=req.user, audit_prompt=messages)


@router.post("/v1/responses")
async def create_response(
    req: ResponseRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    service: GenerationService = Depends(generation_service),
) -> Response:
    store = response_store(request)
    spec = generation_request(req, _history(store, req, key))
    try:
        gen = await service.start(request, key, spec)
    except APIError as e:
        if e.code == "context_length_exceeded":
            e.param = "input"
        raise
    keep = store is not None and req.store is not False  # OpenAI's default is to store
    draft = Draft(req, gen, store if keep else None, _owner(key))
    headers = {IGNORED_TOOLS_HEADER: ", ".join(req.ignored_tools)} if req.ignored_tools else {}
    if req.stream:
        w = EventWriter(draft)
        streamed = service.stream(gen, _events(gen, w), tail=w.tail, error=w.error)
        streamed.headers.update(headers)
        return streamed
    await service.collect(gen)
    c = gen.choices[0]
    assert c.finished is not None
    text, calls = split_reply(c.output, req.tool_names, max_calls=req.call_limit())
    draft.output = output_items(draft, text, calls, c.finished.finish_reason)
    return JSONResponse(draft.finish(gen), headers=headers)


class Draft:
    """One response from creation to its final object (and its row in the store)."""

    def __init__(
        self, req: ResponseRequest, gen: Generation, store: ResponseStore | None, owner: str
    ) -> None:
        self.req = req
        self.id = _new_id("resp")
        self.created_at = gen.ctx.created
        self.model = gen.model
        self.store = store
        self.owner = owner
        self.output: list[OutputItem] = []
        self.incomplete = False

    def obj(self, status: str, **extra: Any) -> ResponseObject:
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=self.model,
            store=self.store is not None,
            **self.req.echo(),
            **extra,
        )

    def started(self) -> dict[str, Any]:
        return self.obj("in_progress").model_dump(mode="json")

    def finish(self, gen: Generation) -> dict[str, Any]:
        """The final object, with usage; kept in the store when asked to."""
        response = self.obj(
            "incomplete" if self.incomplete else "completed",
            completed_at=int(time.time()),
            incomplete_details=IncompleteDetails() if self.incomplete else None,
            output=self.output,
            usage=ResponseUsage.of(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens),
        )
        body = response.model_dump(mode="json")
        if self.store is not None:
            body["store"] = self._save(body)
        return body

    def failed(self, err: APIError) -> dict[str, Any]:
        code = "rate_limit_exceeded" if err.status == 429 else "server_error"
        return self.obj("failed", error=ResponseError(code=code, message=err.message)).model_dump(
            mode="json"
        )

    def _save(self, body: dict[str, Any]) -> bool:
        assert self.store is not None
        items = [
            item.model_dump(mode="json", by_alias=True, exclude_none=True)
            for item in self.req.input_items()
        ]
        try:
            self.store.save(self.owner, body, items)
        except Exception as e:  # a full disk must not lose the answer; the response says so
            log.error("could not store response %s: %s", self.id, type(e).__name__)
            return False
        return True


def output_items(
    draft: Draft, text: str, calls: list[ToolCall], reason: str, msg_id: str | None = None
) -> list[OutputItem]:
    """The output of a finished generation (text and calls from `split_reply`): a message, and
    the function calls; the message only when it has text or there are no calls."""
    draft.incomplete = reason == "length"
    status = "incomplete" if draft.incomplete else "completed"
    items: list[OutputItem] = [_message(text, status, msg_id)] if text or not calls else []
    items += [
        FunctionCallOut(
            id=_new_id("fc"), call_id=c.id, name=c.name, arguments=c.arguments, status="completed"
        )
        for c in calls
    ]
    return items


def _message(text: str, status: str, item_id: str | None = None) -> OutputMessage:
    return OutputMessage(
        id=item_id or _new_id("msg"), status=status, content=[OutputText(text=text)]
    )


# -- streaming ---------------------------------------------------------------------------------


class EventWriter:
    """The numbered events of one streamed response."""

    def __init__(self, draft: Draft) -> None:
        self.draft = draft
        self.seq = 0

    def event(self, kind: str, body: dict[str, Any]) -> bytes:
        data = json.dumps(
            {"type": kind, "sequence_number": self.seq, **body},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        self.seq += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def lifecycle(self, kind: str, response: dict[str, Any]) -> bytes:
        return self.event(kind, {"response": response})

    def delta(self, item_id: str, index: int, text: str) -> bytes:
        # The hot path: one small event per token.
        return self.event(
            "response.output_text.delta",
            {
                "item_id": item_id,
                "output_index": index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            },
        )

    def item_added(self, index: int, item: dict[str, Any]) -> bytes:
        return self.event("response.output_item.added", {"output_index": index, "item": item})

    def message_open(self, index: int, item_id: str) -> bytes:
        empty = _message("", "in_progress", item_id).model_dump(mode="json")
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return self.item_added(index, {**empty, "content": []}) + self.event(
            "response.content_part.added",
            {"item_id": item_id, "output_index": index, "content_index": 0, "part": part},
        )

    def message_close(self, index: int, item: OutputMessage) -> bytes:
        part = item.content[0].model_dump(mode="json")
        where = {"item_id": item.id, "output_index": index, "content_index": 0}
        return (
            self.event("response.output_text.done", {**where, "text": part["text"], "logprobs": []})
            + self.event("response.content_part.done", {**where, "part": part})
            + self.item_done(index, item)
        )

    def item_done(self, index: int, item: OutputItem) -> bytes:
        return self.event(
            "response.output_item.done",
            {"output_index": index, "item": item.model_dump(mode="json")},
        )

    def function_call(self, index: int, call: FunctionCallOut) -> bytes:
        opened = call.model_copy(update={"arguments": "", "status": "in_progress"})
        where = {"item_id": call.id, "output_index": index}
        return (
            self.item_added(index, opened.model_dump(mode="json"))
            + self.event(
                "response.function_call_arguments.delta", {**where, "delta": call.arguments}
            )
            + self.event(
                "response.function_call_arguments.done", {**where, "arguments": call.arguments}
            )
            + self.item_done(index, call)
        )

    def rest(self, items: list[OutputItem], opened: bool, text: str) -> bytes:
        """The end of the output: the message's last text (opened if it had none yet) and
        its close, then the function calls."""
        out = b""
        for index, item in enumerate(items):
            if isinstance(item, OutputMessage):
                out += b"" if opened else self.message_open(index, item.id)
                out += self.delta(item.id, index, text) if text else b""
                out += self.message_close(index, item)
            else:
                out += self.function_call(index, item)
        return out

    def tail(self, gen: Generation) -> bytes:
        """After accounting (usage is final): response.completed or response.incomplete."""
        body = self.draft.finish(gen)
        kind = "response.incomplete" if self.draft.incomplete else "response.completed"
        return self.lifecycle(kind, body)

    def error(self, err: APIError) -> bytes:
        """A failure after the stream started (status 200 is long sent)."""
        return self.lifecycle("response.failed", self.draft.failed(err))


async def _events(gen: Generation, w: EventWriter) -> AsyncIterator[bytes]:
    draft = w.draft
    started = draft.started()
    yield w.lifecycle("response.created", started) + w.lifecycle("response.in_progress", started)
    # With tools, text goes out as soon as it cannot be part of a call; calls come at the end.
    split = ReplySplitter(draft.req.tool_names, max_calls=draft.req.call_limit())
    msg_id = _new_id("msg")
    opened = False  # the message item (always output 0) has been announced
    async for item in with_heartbeat(gen.events(), HEARTBEAT_S):
        if item is None:
            yield b": keep-alive\n\n"
            continue
        _, ev = item
        if isinstance(ev, Delta):
            shown = split.feed(ev.text) if ev.text else ""
            if shown:
                yield (b"" if opened else w.message_open(0, msg_id)) + w.delta(msg_id, 0, shown)
                opened = True
            continue
        assert isinstance(ev, Finished)
        if ev.finish_reason in ("error", "cancelled"):
            return  # the service raises it; `error` renders response.failed
        rest, calls = split.finish()
        draft.output = output_items(draft, split.text, calls, ev.finish_reason, msg_id)
        yield w.rest(draft.output, opened, rest)


# -- GET / DELETE /v1/responses/{id} -----------------------------------------------------------


def _stored(request: Request) -> ResponseStore:
    store = response_store(request)
    if store is None:
        raise APIError(
            404,
            f"this server keeps no responses; to keep them, {ENABLE_STORE} and send store: true",
            code="not_found",
        )
    return store


def _missing(response_id: str) -> APIError:
    return APIError(
        404,
        f"no stored response {response_id!r} (never stored, deleted, or made by another key)",
        code="not_found",
    )


@router.get("/v1/responses/{response_id}")
async def get_response(
    response_id: str, request: Request, key: ApiKey | None = Depends(authenticate)
) -> JSONResponse:
    body = _stored(request).get(_owner(key), response_id)
    if body is None:
        raise _missing(response_id)
    return JSONResponse(body)


@router.delete("/v1/responses/{response_id}")
async def delete_response(
    response_id: str, request: Request, key: ApiKey | None = Depends(authenticate)
) -> JSONResponse:
    if not _stored(request).delete(_owner(key), response_id):
        raise _missing(response_id)
    return JSONResponse(DeletedResponse(id=response_id).model_dump(mode="json"))
