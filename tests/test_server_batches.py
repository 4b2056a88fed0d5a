"""OpenAI's Batch API on a real server and the real engine (SmolLM2), driven by the `openai`
SDK: upload, create, poll to completed, output and error files keyed by custom_id, cancel,
a restart mid-batch that reruns no finished line, billing to the creating key, and isolation
between keys."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from server_harness import Running, running_server

from freehold.config import paths
from freehold.server.auth import KeyStore
from freehold.server.batches.lines import parse_input
from freehold.server.errors import APIError

CHAT = "/v1/chat/completions"
LINES = 200


def _line(i: int, *, url: str = CHAT, max_tokens: int = 4) -> dict[str, Any]:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"Count to {i % 10}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _upload(client: openai.OpenAI, data: bytes) -> str:
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def _start(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    file_id = _upload(client, _jsonl(lines))
    return client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id


def _wait(
    client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 60
) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} is {batch.status}, not {statuses}")


def _file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _billed(server: Running) -> list[tuple[str, str, int]]:
    """(request id, key, status) of every ledger row of batch chat lines."""
    server.services.ledger.flush()
    with sqlite3.connect(server.home / "ledger.db") as db:
        return db.execute(
            "SELECT request_id, COALESCE(key_name, ''), status FROM requests "
            "WHERE endpoint = 'batch.chat'"
        ).fetchall()


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("batches")
    with KeyStore(paths(home).keys) as keys:
        _, alice = keys.create("alice")
        _, bob = keys.create("bob")
    with running_server(home, {"smollm2": smollm2_path}, ready_headers=_bearer(alice)) as server:
        yield server, alice, bob


def _client(server: Running, secret: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=secret, max_retries=0)


def test_batch_runs_to_completed_with_outputs_keyed_by_custom_id(keyed: Any) -> None:
    server, alice_secret, bob_secret = keyed
    alice, bob = _client(server, alice_secret), _client(server, bob_secret)
    lines = [_line(i) for i in range(LINES - 1)] + [
        {**_line(999), "url": "/v1/embeddings", "custom_id": "bad"}
    ]
    batch_id = _start(alice, lines)
    # Interactive requests keep their places while the batch runs.
    _wait(alice, batch_id, {"in_progress"}, timeout=10)
    reply = alice.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None

    batch = _wait(alice, batch_id, {"completed", "failed"})
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": LINES, "completed": 199, "failed": 1}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.usage is not None and batch.usage.output_tokens > 0

    out = _file_lines(alice, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(LINES - 1))
    for o in out:
        assert o["error"] is None
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "chat.completion"
        assert o["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    errors = _file_lines(alice, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"] is None
    assert "is not the batch's endpoint" in errors[0]["error"]["message"]

    # Every line ran once, billed to alice: the ledger's request ids are the output lines' ids.
    billed = {rid: (key, status) for rid, key, status in _billed(server)}
    assert all(billed[o["id"]] == ("alice", 200) for o in out)
    assert len({o["id"] for o in out}) == 199

    # bob sees none of it.
    for call in (
        lambda: bob.batches.retrieve(batch_id),
        lambda: bob.batches.cancel(batch_id),
        lambda: bob.files.retrieve(batch.input_file_id),
        lambda: bob.files.content(batch.output_file_id or ""),
        lambda: bob.files.delete(batch.input_file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch_id not in [b.id for b in bob.batches.list()]
    assert bob.files.list().data == []
    listed = {f.id: f.purpose for f in alice.files.list()}
    assert listed[batch.input_file_id] == "batch"
    assert listed[batch.output_file_id or ""] == "batch_output"
    assert batch_id in [b.id for b in alice.batches.list()]


def test_cancel_reaches_cancelled_with_what_finished(keyed: Any) -> None:
    server, alice_secret, _ = keyed
    alice = _client(server, alice_secret)
    batch_id = _start(alice, [_line(i) for i in range(LINES)])
    _wait(alice, batch_id, {"in_progress"}, timeout=10)
    cancelling = alice.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled")

    batch = _wait(alice, batch_id, {"cancelled"}, timeout=30)
    assert batch.cancelling_at and batch.cancelled_at
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    assert done < LINES
    assert len(_file_lines(alice, batch.output_file_id)) == done
    assert alice.batches.cancel(batch_id).status == "cancelled"  # cancelling again is harmless
    finished = _start(alice, [_line(1)])
    _wait(alice, finished, {"completed"})
    with pytest.raises(openai.ConflictError):  # a batch that ended cannot be cancelled
        alice.batches.cancel(finished)


def test_restart_mid_batch_resumes_without_rerunning_finished_lines(
    tmp_path: Path, smollm2_path: Path
) -> None:
    with KeyStore(paths(tmp_path).keys) as keys:
        _, secret = keys.create("carol")
    models = {"smollm2": smollm2_path}
    lines = [_line(i, max_tokens=6) for i in range(LINES)]
    with running_server(tmp_path, models, ready_headers=_bearer(secret)) as first:
        client = _client(first, secret)
        batch_id = _start(client, lines)
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch_id).request_counts.completed < 30:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stopped_at = client.batches.retrieve(batch_id).request_counts
        assert stopped_at is not None and stopped_at.completed < LINES
    with running_server(tmp_path, models, ready_headers=_bearer(secret)) as second:
        client = _client(second, secret)
        batch = _wait(client, batch_id, {"completed"})
        assert batch.request_counts is not None
        assert batch.request_counts.completed == LINES
        out = _file_lines(client, batch.output_file_id)
        ids = [o["custom_id"] for o in out]
        assert len(ids) == LINES and set(ids) == {f"req-{i}" for i in range(LINES)}
        billed = [(key, status) for _, key, status in _billed(second)]
    # Lines cancelled by the stop are billed for what they computed (status 503), and run again;
    # every line succeeds exactly once.
    assert [b for b in billed if b[1] == 200] == [("carol", 200)] * LINES
    assert {b for b in billed if b[1] != 200} <= {("carol", 503)}


def test_malformed_lines_go_to_the_error_file_with_why() -> None:
    good = _line(1)
    raw = b"\n".join(
        [
            json.dumps(good).encode(),
            b"{not json",
            json.dumps({**good, "custom_id": None}).encode(),
            json.dumps({**good, "custom_id": "u", "url": "/v1/images/generations"}).encode(),
            json.dumps(good).encode(),  # duplicate custom_id
            json.dumps(
                {**good, "custom_id": "t", "body": {**good["body"], "temperature": "hot"}}
            ).encode(),
            json.dumps(
                {**good, "custom_id": "s", "body": {**good["body"], "stream": True}}
            ).encode(),
        ]
    )
    parsed = parse_input(raw, CHAT)
    assert [p.line for p in parsed] == [1, 2, 3, 4, 5, 6, 7]
    assert parsed[0].body is not None and parsed[0].error is None
    errors = [p.error or "" for p in parsed[1:]]
    assert "not valid JSON" in errors[0]
    assert "custom_id" in errors[1] and "missing" in errors[1]
    assert "is not the batch's endpoint" in errors[2]
    assert "used by an earlier line" in errors[3]
    assert "temperature" in errors[4]
    assert "cannot stream" in errors[5]
    assert all(p.body is None for p in parsed[1:])


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\xff\xfe garbage", "not UTF-8"),
        (b"hello\nworld\n", "not JSONL"),
        (b"", "not JSONL"),
    ],
)
def test_a_file_that_is_no_batch_input_is_refused(data: bytes, says: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_input(data, CHAT)
    assert caught.value.status == 400 and says in caught.value.message


def test_create_refuses_bad_files_with_400(keyed: Any) -> None:
    server, alice_secret, _ = keyed
    alice = _client(server, alice_secret)
    not_jsonl = _upload(alice, b"just some text\n")
    with pytest.raises(openai.BadRequestError) as caught:
        alice.batches.create(input_file_id=not_jsonl, endpoint=CHAT, completion_window="24h")
    assert "not JSONL" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        alice.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
    assert "purpose" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        alice.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        alice.batches.create(
            input_file_id=not_jsonl,
            endpoint="/v1/moderations",  # type: ignore[arg-type]
            completion_window="24h",
        )
    deleted = alice.files.delete(not_jsonl)
    assert deleted.deleted and deleted.id == not_jsonl
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(not_jsonl)


@pytest.mark.parametrize(
    ("endpoint", "body", "shape"),
    [
        ("/v1/completions", {"prompt": "Once upon", "max_tokens": 4}, "text_completion"),
        ("/v1/embeddings", {"input": ["a cat", "a dog"]}, "list"),
    ],
)
def test_completions_and_embeddings_batches(
    keyed: Any, endpoint: str, body: dict[str, Any], shape: str
) -> None:
    server, alice_secret, _ = keyed
    alice = _client(server, alice_secret)
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": endpoint,
            "body": {"model": "smollm2", **body},
        }
        for i in range(3)
    ]
    file_id = _upload(alice, _jsonl(lines))
    created = alice.batches.create(
        input_file_id=file_id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert created.metadata == {"job": "nightly"}
    batch = _wait(alice, created.id, {"completed"})
    out = _file_lines(alice, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == ["c0", "c1", "c2"]
    assert all(o["response"]["body"]["object"] == shape for o in out)
    assert batch.error_file_id is None
