"""/v1/files and /v1/batches: OpenAI's Files API (for batch input and output) and Batch API.

Every file and batch belongs to the key that made it (the key's name; "" on a server without
keys); another key gets 404 for it, as if it did not exist. The router's lifespan opens the
store and starts the runner with the server, and stops both before the ledger closes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.batches.lines import parse_input
from freehold.server.batches.protocol import (
    FILE_PURPOSES,
    BatchCreateRequest,
    BatchList,
    BatchObject,
    FileDeleted,
    FileList,
    FileObject,
)
from freehold.server.batches.runner import BatchRunner
from freehold.server.batches.store import BatchStore
from freehold.server.errors import APIError, utf8_safe
from freehold.server.services import Services


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    s: Services = app.state.services
    store = BatchStore(s.settings.home.batches, s.settings.home.batch_files)
    runner = BatchRunner(store, s, app.state.generation)
    app.state.batch_store, app.state.batch_runner = store, runner
    runner.start()  # resumes whatever a previous run left in progress
    try:
        yield
    finally:
        await runner.stop()
        store.close()


router = APIRouter(lifespan=_lifespan)


def batch_store(request: Request) -> BatchStore:
    return request.app.state.batch_store


def _owner(key: ApiKey | None) -> str:
    return key.name if key is not None else ""


def _json(model: BaseModel) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


# -- files -------------------------------------------------------------------------------------


@router.post("/v1/files")
async def upload_file(
    file: UploadFile = File(...),
    purpose: str = Form(...),
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    if purpose not in FILE_PURPOSES:
        raise APIError(
            400,
            f"Freehold keeps files for the Batch API only: purpose must be 'batch', not "
            f"{purpose!r}",
            param="purpose",
        )
    data = await file.read()
    name = utf8_safe(file.filename or "")[:255] or "upload.jsonl"
    stored = await run_in_threadpool(store.add_file, _owner(key), name, purpose, data)
    return _json(stored)


@router.get("/v1/files")
async def list_files(
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(10_000, ge=1, le=10_000),
    order: Literal["asc", "desc"] = "desc",
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    files, more = store.list_files(
        _owner(key), purpose=purpose, after=after, limit=limit, newest_first=order == "desc"
    )
    first, last = (files[0].id, files[-1].id) if files else (None, None)
    return _json(FileList(data=files, has_more=more, first_id=first, last_id=last))


@router.get("/v1/files/{file_id}")
async def get_file(
    file_id: str,
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    return _json(_file_or_404(store, key, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(
    file_id: str,
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    f = _file_or_404(store, key, file_id)
    return FileResponse(store.content_path(f.id), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(
    file_id: str,
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    if not await run_in_threadpool(store.delete_file, _owner(key), file_id):
        raise _no_file(file_id)
    return _json(FileDeleted(id=file_id))


def _file_or_404(store: BatchStore, key: ApiKey | None, file_id: str) -> FileObject:
    f = store.get_file(_owner(key), file_id)
    if f is None:
        raise _no_file(file_id)
    return f


def _no_file(file_id: str) -> APIError:
    return APIError(404, f"no file {file_id!r}", param="file_id", code="file_not_found")


# -- batches -----------------------------------------------------------------------------------


@router.post("/v1/batches")
async def create_batch(
    req: BatchCreateRequest,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    owner = _owner(key)
    f = store.get_file(owner, req.input_file_id)
    if f is None:
        raise APIError(
            404,
            f"no file {req.input_file_id!r}; upload the input with purpose 'batch' first",
            param="input_file_id",
            code="file_not_found",
        )
    if f.purpose != "batch":
        raise APIError(
            400,
            f"the file {f.id!r} has purpose {f.purpose!r}; a batch's input needs purpose 'batch'",
            param="input_file_id",
            code="invalid_input_file",
        )
    data = await run_in_threadpool(store.content_path(f.id).read_bytes)
    lines = await run_in_threadpool(parse_input, data, req.endpoint)
    batch_id = await run_in_threadpool(
        store.create_batch, owner, req.endpoint, f.id, req.metadata, lines
    )
    request.app.state.batch_runner.wake()
    return _json(_batch_or_404(store, key, batch_id))


@router.get("/v1/batches")
async def list_batches(
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    batches, more = store.list_batches(_owner(key), after=after, limit=limit)
    first, last = (batches[0].id, batches[-1].id) if batches else (None, None)
    return _json(BatchList(data=batches, has_more=more, first_id=first, last_id=last))


@router.get("/v1/batches/{batch_id}")
async def get_batch(
    batch_id: str,
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    return _json(_batch_or_404(store, key, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(
    batch_id: str,
    request: Request,
    key: ApiKey | None = Depends(authenticate),
    store: BatchStore = Depends(batch_store),
) -> Response:
    batch = _batch_or_404(store, key, batch_id)
    if batch.status in ("validating", "in_progress"):
        # Running lines finish (their work is done and billed); no new line starts.
        store.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
        request.app.state.batch_runner.wake()
    elif batch.status not in ("cancelling", "cancelled"):
        raise APIError(
            409,
            f"the batch {batch_id!r} is {batch.status}; only a running batch can be cancelled",
            code="batch_not_cancellable",
        )
    return _json(_batch_or_404(store, key, batch_id))


def _batch_or_404(store: BatchStore, key: ApiKey | None, batch_id: str) -> BatchObject:
    b = store.get_batch(_owner(key), batch_id)
    if b is None:
        raise APIError(404, f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
    return b
