"""Keys, per-model permissions, rate limits, the usage ledger and the audit log."""

from __future__ import annotations

import ipaddress
import json
import ssl
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI, PermissionDeniedError
from server_harness import Running, running_server

from freehold.config import paths
from freehold.errors import InvalidInput
from freehold.server.auth import KeyStore
from freehold.server.lifecycle import check_security
from freehold.server.settings import ServerSettings

CHAT = "smollm2"
BASE = "gemma"  # a base model: completions only
SECRET_PROMPT = "purple-walrus-7731 confidential"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth-home")


@pytest.fixture(scope="module")
def secrets(home: Path) -> dict[str, str]:
    with KeyStore(paths(home).keys) as store:
        return {
            "all": store.create("all")[1],
            "chat-only": store.create("chat-only", models=[CHAT])[1],
            "slow": store.create("slow", rpm=2)[1],
            "thrifty": store.create("thrifty", tpm=10)[1],
            "acct": store.create("acct")[1],
        }


@pytest.fixture(scope="module")
def server(home: Path, secrets: dict[str, str], smollm2_path: Path, gemma_path: Path) -> Running:
    auth = {"Authorization": f"Bearer {secrets['all']}"}
    models = {CHAT: smollm2_path, BASE: gemma_path}
    with running_server(home, models, ready_headers=auth, slots=2, max_queue=8) as s:
        yield s


@pytest.fixture
def env_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FREEHOLD_HOME", str(home))
    return home


def _client(server: Running, secret: str) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=secret, timeout=180, max_retries=0)


ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{CHAT}", None),
    (
        "POST",
        "/v1/chat/completions",
        {"model": CHAT, "messages": [{"role": "user", "content": "x"}]},
    ),
    ("POST", "/v1/completions", {"model": CHAT, "prompt": "x", "max_tokens": 1}),
    ("POST", "/v1/embeddings", {"model": CHAT, "input": "x"}),
    ("GET", "/metrics", None),
    ("GET", "/ready", None),
    ("GET", "/no/such/route", None),
]


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_every_route_but_health_needs_a_key(
    server: Running, secrets: dict[str, str], method: str, path: str, body: dict | None
) -> None:
    for headers in ({}, {"Authorization": "Bearer fh-wrong"}, {"Authorization": "Basic x"}):
        r = httpx.request(method, server.base + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, headers)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["x-request-id"]
    ok = httpx.request(
        method,
        server.base + path,
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {secrets['all']}"},
    )
    assert ok.status_code == (404 if path == "/no/such/route" else 200)


def test_health_is_open(server: Running) -> None:
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def test_key_limited_to_a_model(server: Running, secrets: dict[str, str]) -> None:
    client = _client(server, secrets["chat-only"])
    assert [m.id for m in client.models.list()] == [CHAT]
    client.completions.create(model=CHAT, prompt="Hi", max_tokens=2)
    with pytest.raises(PermissionDeniedError) as e:
        client.completions.create(model=BASE, prompt="Hi", max_tokens=2)
    assert e.value.status_code == 403 and e.value.body["code"] == "model_not_allowed"
    assert [m.id for m in _client(server, secrets["all"]).models.list()] == [CHAT, BASE]


def test_base_model_serves_completions_not_chat(server: Running, secrets: dict[str, str]) -> None:
    client = _client(server, secrets["all"])
    r = client.completions.create(model=BASE, prompt="The sun is", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    bad = httpx.post(
        server.v1 + "/chat/completions",
        json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {secrets['all']}"},
        timeout=30,
    )
    assert bad.status_code == 400 and "chat template" in bad.json()["error"]["message"]


def test_rpm_limit(server: Running, secrets: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {secrets['slow']}"}
    body = {"model": CHAT, "prompt": "Hi", "max_tokens": 1}
    codes = [
        httpx.post(server.v1 + "/completions", json=body, headers=headers, timeout=30)
        for _ in range(3)
    ]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert 1 <= int(codes[2].headers["retry-after"]) <= 60
    assert codes[2].json()["error"]["code"] == "rate_limit_exceeded"


def test_tpm_limit(server: Running, secrets: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {secrets['thrifty']}"}
    body = {"model": CHAT, "prompt": "Hello there, how are you", "max_tokens": 8}
    first = httpx.post(server.v1 + "/completions", json=body, headers=headers, timeout=30)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 10
    second = httpx.post(server.v1 + "/completions", json=body, headers=headers, timeout=30)
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1


def test_ledger_matches_reported_usage_and_audit_has_no_prompt(
    server: Running, secrets: dict[str, str], env_home: Path, cli
) -> None:  # noqa: ANN001
    client = _client(server, secrets["acct"])
    ask = [{"role": "user", "content": SECRET_PROMPT}]
    reported = []
    r = client.chat.completions.create(model=CHAT, messages=ask, max_tokens=8)
    reported.append(r.usage)
    r = client.completions.create(model=CHAT, prompt=SECRET_PROMPT, max_tokens=5, n=2)
    reported.append(r.usage)
    stream = client.chat.completions.create(
        model=CHAT,
        messages=ask,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    reported.append([c for c in stream][-1].usage)
    r = client.embeddings.create(model=CHAT, input=[SECRET_PROMPT, "two"])
    reported.append(r.usage)
    assert server.services.ledger.flush() and server.services.audit.flush()

    rows = {row["key"]: row for row in cli("usage", "--by", "key", "--json").json()}
    acct = rows["acct"]
    assert acct["requests"] == 4 and acct["failed"] == 0
    assert acct["prompt_tokens"] == sum(u.prompt_tokens for u in reported)
    assert acct["completion_tokens"] == sum(getattr(u, "completion_tokens", 0) for u in reported)
    assert acct["cached_tokens"] == sum(u.prompt_tokens_details.cached_tokens for u in reported[:3])
    by_model = cli("usage", "--by", "model", "--json").json()
    assert {row["model"] for row in by_model} >= {CHAT}
    assert len(cli("usage", "--by", "day", "--json").json()) == 1
    table = cli("usage")
    assert table.code == 0 and "acct" in table.out

    audit = (env_home / "audit.jsonl").read_text()
    assert SECRET_PROMPT not in audit and "purple-walrus" not in audit
    entries = [json.loads(line) for line in audit.splitlines()]
    mine = [e for e in entries if e.get("key") == "acct"]
    assert len(mine) == 4
    for e in mine:
        assert len(e["prompt_sha256"]) == 64 and e["status"] == 200 and e["client"] == "127.0.0.1"
        assert e["request_id"] and "prompt" not in e and "completion" not in e
    assert any(e["status"] == 401 for e in entries)  # refusals are audited too


def test_secrets_never_stored_in_clear(
    server: Running, secrets: dict[str, str], home: Path
) -> None:
    for secret in secrets.values():  # make sure each secret went through the server
        httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    server.services.ledger.flush()
    server.services.audit.flush()
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "keys.db" for p in files)
    for p in files:
        data = p.read_bytes()
        for secret in secrets.values():
            assert secret.encode() not in data, p
            assert secret[3:].encode() not in data, p


def test_keys_cli(env_home: Path, server: Running, cli) -> None:  # noqa: ANN001
    made = cli("keys", "create", "--name", "ci-bot", "--models", f"{CHAT},{BASE}", "--rpm", "60")
    assert made.code == 0
    secret = made.out.strip().splitlines()[-1]
    assert secret.startswith("fh-") and len(secret) > 40
    listed = {k["name"]: k for k in cli("keys", "list", "--json").json()}
    assert listed["ci-bot"]["models"] == [CHAT, BASE] and listed["ci-bot"]["rpm"] == 60
    assert secret not in cli("keys", "list").out
    assert secret not in json.dumps(listed)
    assert cli("keys", "create", "--name", "ci-bot").code != 0  # names are unique
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(server.v1 + "/models", headers=headers, timeout=10).status_code == 200
    assert cli("keys", "revoke", "ci-bot").code == 0
    assert httpx.get(server.v1 + "/models", headers=headers, timeout=10).status_code == 401
    gone = cli("keys", "revoke", "ci-bot")
    assert gone.code != 0 and "no key named" in gone.err


def test_open_network_needs_keys_or_explicit_flag(tmp_path: Path) -> None:
    settings = ServerSettings(host="0.0.0.0", home=paths(tmp_path / "h"))
    with pytest.raises(InvalidInput, match="--insecure-no-auth"):
        check_security(settings)
    settings.insecure_no_auth = True
    assert check_security(settings) is False
    assert check_security(ServerSettings(host="127.0.0.1", home=paths(tmp_path / "h"))) is False
    with KeyStore(paths(tmp_path / "h").keys) as store:
        store.create("k")
    assert check_security(ServerSettings(host="0.0.0.0", home=paths(tmp_path / "h"))) is True


def test_serve_cli_refuses_open_network(cli, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    monkeypatch.setenv("FREEHOLD_HOME", str(tmp_path / "empty"))
    t0 = time.monotonic()
    r = cli("serve", "--host", "0.0.0.0", "--port", "1")
    assert r.code != 0 and "--insecure-no-auth" in r.err
    assert time.monotonic() - t0 < 10  # refused before anything loads


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(tmp_path: Path, smollm2_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with running_server(
        tmp_path / "home", {CHAT: smollm2_path}, slots=1, tls_cert=cert, tls_key=key
    ) as s:
        assert s.base.startswith("https://")
        client = OpenAI(
            base_url=s.v1,
            api_key="unused",
            http_client=httpx.Client(verify=ssl.create_default_context(cafile=cert), timeout=60),
            max_retries=0,
        )
        r = client.completions.create(model=CHAT, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(s.base.replace("https", "http") + "/health", timeout=5)
