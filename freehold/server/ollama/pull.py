"""POST /api/pull onto the vault's importers, with Ollama's streamed status lines.

Freehold makes no download: a pull imports from this machine. The name may be any source
`freehold add` takes (`pkg:DIST`, `hf:ORG/REPO`, `ollama:NAME:TAG`, a `.gguf` path); a bare
Ollama name such as `llama3.2:3b` means the local Ollama models directory (`ollama:llama3.2:3b`).
A pulled model is in the vault but not served until the server restarts with it.

Pulling changes the vault, so a key limited to some models (`--models`) may not pull.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError, from_engine
from freehold.server.ledger import now_iso
from freehold.server.ollama.http import NDJSON, JSONBodyRoute, line
from freehold.server.ollama.protocol import Progress, PullRequest
from freehold.server.services import Services, client_address, services
from freehold.vault import Vault
from freehold.vault.importers import ImportPlan, plan_import
from freehold.vault.store import AddResult

router = APIRouter(route_class=JSONBodyRoute)
ENDPOINT = "ollama.pull"
SCHEMES = ("pkg", "hf", "ollama")

Emit = Callable[[Progress], None]


def pull_source(name: str) -> str:
    """The `freehold add` source a pull names: itself if it is one, else a local Ollama model."""
    scheme, sep, _ = name.partition(":")
    if sep and scheme in SCHEMES:
        return name
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf"):
        return name
    return f"ollama:{name}"


def _line(p: Progress) -> bytes:
    return line(p.dump())


def _audit(
    request: Request, key: ApiKey | None, source: str, model: str | None, status: int
) -> None:
    services(request).audit.write(
        {
            "request_id": request.state.request_id,
            "time": now_iso(),
            "key": key.name if key else None,
            "client": client_address(request),
            "endpoint": ENDPOINT,
            "source": source,
            "model": model,
            "status": status,
        }
    )


def _refusal(e: Exception, source: str) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError | OSError):  # a path the OS will not take (NUL, too long...)
        return APIError(400, f"{source!r} is not a source Freehold can import from: {e}")
    return from_engine(e)


def _store(s: Services, plan: ImportPlan, emit: Emit) -> AddResult:
    """Import into this server's vault (blocking: run in a thread), reporting progress."""
    digest = plan.weights.expected_digest

    def progress(_description: str, total: int) -> Callable[[int], None]:
        done = 0
        status = f"pulling {plan.weights.filename}"
        emit(Progress(status=status, digest=digest, total=total, completed=0))

        def advance(n: int) -> None:
            nonlocal done
            done += n
            emit(Progress(status=status, digest=digest, total=total, completed=done))

        return advance

    with Vault(s.settings.home) as vault:
        return vault.add(plan, progress=progress)


def _finished(result: AddResult) -> list[Progress]:
    ref = result.record.ref
    how = "stored" if result.new_model else "already"
    return [
        Progress(status="verifying sha256 digest", digest=result.record.digest),
        Progress(status="writing manifest"),
        Progress(
            status=f"{how} in the vault as {ref}; serve it by restarting the server with "
            f"`freehold serve --model {ref}`"
        ),
        Progress(status="success"),
    ]


@router.post("/api/pull")
async def pull(
    req: PullRequest, request: Request, key: ApiKey | None = Depends(authenticate)
) -> Response:
    source = pull_source(req.ref)
    if key is not None and key.models is not None:
        _audit(request, key, source, None, 403)
        raise APIError(
            403,
            f"the key {key.name!r} is limited to some models and may not pull into the vault",
            code="model_not_allowed",
        )
    s = services(request)
    try:  # planning reads only small files: a bad source is a plain error status
        plan = await run_in_threadpool(plan_import, source)
    except Exception as e:
        err = _refusal(e, source)
        _audit(request, key, source, None, err.status)
        raise err from None
    if req.stream is False:
        try:
            result = await run_in_threadpool(_store, s, plan, lambda _p: None)
        except Exception as e:
            err = _refusal(e, source)
            _audit(request, key, source, None, err.status)
            raise err from None
        _audit(request, key, source, result.record.ref, 200)
        return JSONResponse(_finished(result)[-1].dump())
    return StreamingResponse(_streamed(request, key, s, plan, source), media_type=NDJSON)


async def _streamed(
    request: Request, key: ApiKey | None, s: Services, plan: ImportPlan, source: str
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    def emit(p: Progress) -> None:  # from the import's thread
        loop.call_soon_threadsafe(lines.put_nowait, _line(p))

    yield _line(Progress(status="pulling manifest"))
    task = asyncio.ensure_future(asyncio.to_thread(_store, s, plan, emit))
    # Progress is queued before the thread ends, so the end marker comes after all of it.
    task.add_done_callback(lambda _t: lines.put_nowait(None))
    while (line := await lines.get()) is not None:
        yield line
    try:
        result = task.result()
    except Exception as e:
        err = _refusal(e, source)
        _audit(request, key, source, None, err.status)
        yield line({"error": err.message})
        return
    _audit(request, key, source, result.record.ref, 200)
    for p in _finished(result):
        yield _line(p)
