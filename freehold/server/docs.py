"""The API's own description: `/openapi.json` and a Swagger UI page at `/docs`.

Both need a key once keys exist, like every route but `/health`. The page loads Swagger UI's
script and stylesheet from this server (`/docs/static/`, shipped unmodified in
`static/swagger-ui/`), never from a CDN, and Swagger UI's online validator is switched off:
opening the docs makes the browser reach nothing beyond this machine.
"""

from __future__ import annotations

import warnings
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response

from freehold.server.access import authenticate
from freehold.server.auth import ApiKey
from freehold.server.errors import APIError

OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
STATIC_PATH = "/docs/static"

# The only files served under /docs/static, with their media types.
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
# An empty icon: without one a browser asks for /favicon.ico (FastAPI's default is remote).
_NO_FAVICON = "data:,"

router = APIRouter(include_in_schema=False)


def _version() -> str:
    try:
        return package_version("freehold")
    except PackageNotFoundError:
        return "0"


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, built once, with how to present a key."""
    if app.openapi_schema is None:
        with warnings.catch_warnings():
            # A route with several methods (GET and HEAD) repeats its operationId in every
            # method; FastAPI warns, and _unique_operation_ids below repairs it.
            warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
            schema = get_openapi(
                title=app.title,
                version=_version(),
                description=(
                    "Freehold's front doors: OpenAI (chat, completions, embeddings, responses), "
                    "Anthropic Messages and Ollama. Once the server has keys, every route but "
                    "/health needs one, as a Bearer token or an x-api-key header."
                ),
                routes=app.routes,
            )
        _unique_operation_ids(schema)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        # `{}` makes the key optional: a server without keys needs none.
        schema["security"] = [{"bearer": []}, {"apiKey": []}, {}]
        app.openapi_schema = schema
    return app.openapi_schema


def _unique_operation_ids(schema: dict[str, Any]) -> None:
    """OpenAPI wants every operationId unique: a repeated one gets its method appended."""
    seen: set[str] = set()
    for operations in schema.get("paths", {}).values():
        for method, op in operations.items():
            op_id = op.get("operationId")
            if op_id is None:
                continue
            if op_id in seen:
                op_id = op["operationId"] = f"{op_id}_{method}"
            seen.add(op_id)


@router.get(OPENAPI_PATH)
async def openapi_json(request: Request, key: ApiKey | None = Depends(authenticate)) -> Response:
    return JSONResponse(openapi_schema(request.app))


@router.get(DOCS_PATH)
async def docs_page(key: ApiKey | None = Depends(authenticate)) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=OPENAPI_PATH,
        title="Freehold API",
        swagger_js_url=f"{STATIC_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_PATH}/swagger-ui.css",
        swagger_favicon_url=_NO_FAVICON,
        # Swagger UI would otherwise send the spec to validator.swagger.io for a badge.
        swagger_ui_parameters={"validatorUrl": None},
    )


@cache
def _asset(name: str) -> bytes:
    return files("freehold.server").joinpath("static", "swagger-ui", name).read_bytes()


@router.get(STATIC_PATH + "/{name}")
async def docs_asset(name: str, key: ApiKey | None = Depends(authenticate)) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no route {STATIC_PATH}/{name}")
    return Response(_asset(name), media_type=media_type)
