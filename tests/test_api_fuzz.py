"""The API's own description (/openapi.json, /docs) and a schemathesis fuzz of every route in it.

The fuzz asks one thing of every operation the server describes: whatever schemathesis sends
(bodies that fit the schema and bodies that break it: wrong types, missing or unknown fields),
the answer is never a 5xx, and a 4xx is in the error shape of the route's door; afterwards the
server still answers and every request it admitted has its ledger row and audit line. Targeted
hostile text, numbers and nesting on every route are in test_api_hostile.py. The fuzz runs
against a real server on SmolLM2 with a tiny context so that any valid generation is short, with
a fixed seed. Deeper runs: `FREEHOLD_FUZZ_EXAMPLES=N`
(default 40 per operation) and `FREEHOLD_FUZZ_COVERAGE=1` (adds schemathesis's coverage phase:
every boundary and negative case the schemas define, bad media types included).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import zlib
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.routing import APIRoute, iter_route_contexts
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from server_harness import Running, running_server

from freehold.config import paths
from freehold.server.app import create_app
from freehold.server.auth import KeyStore
from freehold.server.docs import openapi_schema
from freehold.server.lifecycle import build_pool
from freehold.server.settings import ServerSettings

MODEL = "smollm2"
EXAMPLES = int(os.environ.get("FREEHOLD_FUZZ_EXAMPLES", "40"))
# schemathesis's coverage phase sends every boundary and negative case the schema defines
# (about 5,000 requests, 5 minutes here): too long for every run, so it is asked for.
COVERAGE = os.environ.get("FREEHOLD_FUZZ_COVERAGE") == "1"
TIMEOUT_S = 180.0  # a valid generation takes seconds (more on a busy machine); minutes: a hang

# Every door's routes, as the issue names them: the description must list them all.
DOOR_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/models/{model_id}",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/responses/{response_id}",
    "/v1/files",
    "/v1/files/{file_id}",
    "/v1/files/{file_id}/content",
    "/v1/batches",
    "/v1/batches/{batch_id}",
    "/v1/batches/{batch_id}/cancel",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/version",
    "/api/pull",
    "/health",
    "/ready",
    "/metrics",
}
# Routes deliberately left out of the description, and so out of the schemathesis run, and why.
# The Ollama ones take no input; test_undescribed_routes_answer_without_5xx calls each of them.
UNDESCRIBED = {
    "/openapi.json": "the description itself",
    "/docs": "the page that shows the description",
    "/docs/static/{name}": "Swagger UI's script and stylesheet for /docs",
    "/": "Ollama's 'Ollama is running' probe",
    "/api/create": "Ollama model-store route: a 404 pointing to the freehold CLI",
    "/api/copy": "Ollama model-store route: a 404 pointing to the freehold CLI",
    "/api/delete": "Ollama model-store route: a 404 pointing to the freehold CLI",
    "/api/push": "Ollama model-store route: a 404 pointing to the freehold CLI",
    "/api/blobs/{digest}": "Ollama model-store route: a 404 pointing to the freehold CLI",
}
DOCS_ROUTES = {"/openapi.json", "/docs", "/docs/static/{name}"}
# POSTs whose body is not JSON, as OpenAI defines them: the Files API's multipart upload, and a
# batch's cancel, which takes no body.
FORM_BODIES = {"/v1/files": "multipart/form-data"}
BODILESS_POSTS = {"/v1/batches/{batch_id}/cancel"}


def _describe_app() -> tuple[dict, dict[str, set[str]]]:
    """The description and every route (path: methods) of an app built but never started."""
    with tempfile.TemporaryDirectory() as tmp:
        conf = ServerSettings(models=[MODEL], home=paths(Path(tmp)))
        app = create_app(conf, build_pool(conf, {}))
        s = app.state.services
        try:
            spec = openapi_schema(app)
            routes: dict[str, set[str]] = {}
            for route in iter_route_contexts(app.routes):
                if isinstance(route.original_route, APIRoute):
                    routes.setdefault(route.path_format, set()).update(route.methods)
        finally:  # what the lifespan would close; this app never starts
            s.ledger.close()
            s.audit.close()
            s.keys.close()
    return spec, routes


# Built at import, so schemathesis makes its tests when the module is collected. (Its lazy
# `from_fixture` loader, which could read the running server's copy, fails on pytest 9.)
SPEC, ROUTES = _describe_app()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Running]:
    home = tmp_path_factory.mktemp("fuzz-home")
    # No keys: the fuzz reaches every handler. The response store is on so that
    # GET/DELETE /v1/responses/{id} and previous_response_id run their real code. A 128-token
    # context keeps every valid generation short, and with no queue a fuzzed `n: 16` is a
    # quick 429 rather than minutes of work (requests arrive one at a time anyway).
    with running_server(
        home, {MODEL: smollm2_path}, slots=2, ctx=128, max_queue=0, store_responses=True
    ) as s:
        yield s


def test_openapi_describes_every_door(server: Running) -> None:
    spec = httpx.get(server.base + "/openapi.json", timeout=30).json()
    assert spec == SPEC  # the served description is the app's (which the fuzz below uses)
    assert spec["openapi"].startswith("3.")
    missing = DOOR_PATHS - set(spec["paths"])
    assert not missing, f"routes missing from /openapi.json: {sorted(missing)}"
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if method in ("post", "put", "patch") and path not in BODILESS_POSTS:
                media = FORM_BODIES.get(path, "application/json")
                body = op.get("requestBody", {}).get("content", {}).get(media)
                assert body and body.get("schema"), f"{method.upper()} {path} has no body schema"
    op_ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(op_ids) == len(set(op_ids)), "operationIds repeat"
    # A client learns how to present a key.
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["apiKey"]["name"] == "x-api-key"


def test_every_route_is_described_or_listed_as_left_out() -> None:
    spec, routes = SPEC, ROUTES
    hidden = set(routes) - set(spec["paths"])
    assert hidden == set(UNDESCRIBED), f"routes neither described nor listed: {hidden}"
    for path, methods in routes.items():
        if path in spec["paths"]:
            described = {m.upper() for m in spec["paths"][path]}
            assert methods <= described, f"{path}: {methods - described} undescribed"


def test_undescribed_routes_answer_without_5xx(server: Running) -> None:
    for path in set(UNDESCRIBED) - DOCS_ROUTES:
        url = server.base + re.sub(r"\{[^}]*\}", "x", path)
        for method in ROUTES[path]:
            for body in (None, b"{}", b"not json", b'{"model": 1, "name": ["smollm2"]}'):
                r = httpx.request(method, url, content=body, timeout=30)
                assert r.status_code < 500, (method, path, body, r.status_code, r.text)


def _readme_digests() -> dict[str, str]:
    text = files("freehold.server").joinpath("static/swagger-ui/README.md").read_text()
    return {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)}


def test_docs_page_loads_nothing_from_elsewhere(server: Running) -> None:
    r = httpx.get(server.base + "/docs", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert urls and all(u.startswith(("/", "data:")) for u in urls), urls
    assert "http://" not in html and "https://" not in html
    assert '"validatorUrl": null' in html  # Swagger UI's default posts the spec to swagger.io
    assert "'/openapi.json'" in html
    digests = _readme_digests()
    for url in urls:
        if url.startswith("data:"):
            continue
        asset = httpx.get(server.base + url, timeout=30)
        assert asset.status_code == 200, url
        name = url.rsplit("/", 1)[-1]
        # Shipped and served unmodified: the bytes are the ones swagger-ui-dist published.
        assert hashlib.sha256(asset.content).hexdigest() == digests[name], name
    assert {"swagger-ui-bundle.js", "swagger-ui.css"} <= {u.rsplit("/", 1)[-1] for u in urls}
    gone = httpx.get(server.base + "/docs/static/index.html", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"


def test_docs_need_a_key_once_keys_exist(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path
) -> None:
    home = tmp_path_factory.mktemp("docs-keys-home")
    with KeyStore(paths(home).keys) as store:
        secret = store.create("docs")[1]
    bearer = {"Authorization": f"Bearer {secret}"}
    with running_server(home, {MODEL: smollm2_path}, ready_headers=bearer, slots=1, ctx=256) as s:
        guarded = ["/openapi.json", "/docs", "/docs/static/swagger-ui-bundle.js"]
        for path in guarded:
            assert httpx.get(s.base + path, timeout=30).status_code == 401, path
            wrong = {"Authorization": "Bearer not-the-key"}
            assert httpx.get(s.base + path, headers=wrong, timeout=30).status_code == 401, path
            assert httpx.get(s.base + path, headers=bearer, timeout=30).status_code == 200, path
            api_key = {"x-api-key": secret}
            assert httpx.get(s.base + path, headers=api_key, timeout=30).status_code == 200, path
        assert httpx.get(s.base + "/health", timeout=30).status_code == 200


schema = schemathesis.openapi.from_dict(SPEC)
schema.config.phases.update(phases=["examples", "fuzzing"] + (["coverage"] if COVERAGE else []))


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # a fixed seed: the same requests on every run
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_route_answers_5xx(server: Running, case: schemathesis.Case) -> None:
    # Fuzzed model names are all unknown (a quick 404); half the cases name the served model
    # instead, so that generation, streaming and the store see fuzzed parameters too. (Chosen
    # from the case itself: schemathesis's coverage phase is off with a @schema.given strategy.)
    drawn = repr((case.body, case.path_parameters, case.query)).encode()
    real_model = zlib.crc32(drawn) % 2 == 0
    if real_model and isinstance(case.body, dict):
        for field in ("model", "name"):
            if isinstance(case.body.get(field), str):
                case.body[field] = MODEL
    if real_model and case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = MODEL
    case.call_and_validate(
        server.base, checks=[not_a_server_error, error_in_the_doors_shape], timeout=TIMEOUT_S
    )


def error_in_the_doors_shape(ctx: object, response: Any, case: schemathesis.Case) -> None:
    """A 4xx is in the error shape of the door the path belongs to, so each door's clients
    (the OpenAI and Anthropic SDKs, Ollama's) can read why."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    path = case.operation.path
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
    elif path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
    else:
        assert isinstance(body["error"]["message"], str) and "param" in body["error"], body


def test_the_fuzz_left_the_accounting_whole(server: Running) -> None:
    """Runs after the fuzz: the server answers, its writers are alive, and every request it
    admitted has both its ledger row and its audit line."""
    s = server.services
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200
    assert s.ledger.flush() and s.audit.flush()
    assert s.ledger._thread.is_alive() and s.audit._thread.is_alive()
    entries = [json.loads(x) for x in (server.home / "audit.jsonl").read_text().splitlines()]
    with sqlite3.connect(server.home / "ledger.db") as db:
        ids = {row[0] for row in db.execute("SELECT request_id FROM requests")}
    # A pull is audited but not metered: every other line has its ledger row, and each row a line.
    assert entries and ids == {e["request_id"] for e in entries if e["endpoint"] != "ollama.pull"}
