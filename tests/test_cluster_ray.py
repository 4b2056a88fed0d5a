"""`freehold serve --cluster` on a real 2-node Ray cluster on loopback, with the real engine on
SmolLM2 in each replica, driven by the official OpenAI SDK through Freehold's gateway.

The cluster is `ray.cluster_utils.Cluster` (every node on 127.0.0.1, as NOTES.md says), started
and stopped here. One gateway serves for the whole module; the tests run in order (placement,
quotas, failover, self-heal), since failover kills the worker node.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # Serve's threads must not reconnect after shutdown

import ray  # noqa: E402
from openai import OpenAI  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from server_harness import running_server  # noqa: E402

from freehold.cluster.ray_serve import ClusterPlan  # noqa: E402
from freehold.server.auth import KeyStore  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
LONG = 150


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def gateway(
    cluster: Any, smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("gateway")
    node_cache = tmp_path_factory.mktemp("node-cache")
    from freehold.config import paths

    with KeyStore(paths(home).keys) as keys:
        _, admin = keys.create("team")
        _, limited = keys.create("limited", rpm=3)
    plan = ClusterPlan(address=cluster.address, node_cache=node_cache)
    headers = {"Authorization": f"Bearer {admin}"}
    with running_server(
        home, {"smollm2": smollm2_path}, ready_headers=headers, cluster=plan, slots=8, ctx=2048
    ) as srv:
        srv.secrets = {"team": admin, "limited": limited}  # type: ignore[attr-defined]
        srv.node_cache = node_cache  # type: ignore[attr-defined]
        yield srv


def client(srv: Any, key: str = "team") -> OpenAI:
    return OpenAI(base_url=srv.v1, api_key=srv.secrets[key], max_retries=0, timeout=120)


def engine(srv: Any) -> Any:
    return srv.services.registry.engine("smollm2")


def greedy_stream(srv: Any, max_tokens: int = LONG) -> str:
    stream = client(srv).chat.completions.create(
        model="smollm2",
        messages=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)


def test_one_replica_on_each_node_and_a_stream_through_the_gateway(
    gateway: Any, cluster: Any, smollm2_path: Path
) -> None:
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert sorted(engine(gateway).replica_nodes()) == sorted(nodes)
    text = greedy_stream(gateway, 16)
    assert len(text) > 20
    # The worker node had no model: its replica fetched it from the gateway's, verified.
    fetched = list(Path(gateway.node_cache).glob("sha256-*"))
    assert len(fetched) == 1 and fetched[0].stat().st_size == smollm2_path.stat().st_size
    assert not list(Path(gateway.node_cache).glob(".*partial"))


def test_a_keys_rpm_holds_across_replicas(gateway: Any) -> None:
    c = client(gateway, "limited")
    codes = []
    for _ in range(5):
        try:
            c.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=2)
            codes.append(200)
        except Exception as e:  # openai.RateLimitError
            codes.append(getattr(e, "status_code", 0))
    assert codes == [200, 200, 200, 429, 429]


def test_requests_sharing_a_long_prefix_go_to_the_replica_that_holds_it(gateway: Any) -> None:
    rules = " ".join(f"Rule {i}: answer in one short, polite sentence." for i in range(1, 90))
    eng = engine(gateway)
    system = [{"role": "system", "content": rules}]
    assert len(eng.chat_tokens(system)) >= 1000
    before = eng.requests_by_replica.copy()
    hits_before = eng.cache_hits_by_replica.copy()
    for i in range(6):
        client(gateway).chat.completions.create(
            model="smollm2",
            messages=[*system, {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
            max_tokens=4,
        )
    routed = eng.requests_by_replica - before
    replica, count = routed.most_common(1)[0]
    assert count >= 5, routed
    assert (eng.cache_hits_by_replica - hits_before)[replica] >= count - 1


def test_streams_survive_the_loss_of_a_node(gateway: Any, cluster: Any) -> None:
    expected = greedy_stream(gateway)
    texts: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            texts[i] = greedy_stream(gateway)
        except BaseException as e:  # reported below
            errors.append(e)

    before = _ledger_completion_tokens(gateway)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    worker = next(n for n in cluster.worker_nodes)
    cluster.remove_node(worker, allow_graceful=False)
    t0 = time.perf_counter()
    after_kill = client(gateway).chat.completions.create(
        model="smollm2", messages=PROMPT, max_tokens=1
    )
    new_request_s = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(texts[i] == expected for i in range(6)), [texts[i][:80] for i in range(6)]
    assert after_kill.choices[0].message.content is not None
    print(f"a new request after the kill took {new_request_s:.2f}s")
    assert new_request_s < 5.0
    # Billed: exactly what each stream delivered (plus the reference and the 1-token request).
    delivered = _ledger_completion_tokens(gateway) - before
    assert delivered == 6 * LONG + 1
    failovers = [e for e in _audit(gateway) if e.get("event") == "failover"]
    # One per resumed stream; the 1-token request resumes too when Serve sent it to the lost
    # replica before Ray reported that replica gone.
    streams = [e for e in failovers if e["completion_tokens"] == LONG]
    assert 1 <= len(streams) <= 6, failovers
    assert all(e["completion_tokens"] in (LONG, 1) for e in failovers), failovers
    metrics = httpx.get(gateway.base + "/metrics", headers=_auth(gateway)).text
    resumes = sum(e["resumes"] for e in failovers)
    assert f'freehold_failovers_total{{model="smollm2"}} {float(resumes)}' in metrics


def test_a_replica_returns_when_a_node_does(gateway: Any, cluster: Any) -> None:
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    deadline = time.monotonic() + 30
    while node.node_id not in engine(gateway).replica_nodes():
        assert time.monotonic() < deadline, "no replica on the re-added node within 30 s"
        time.sleep(0.5)
    assert len(greedy_stream(gateway, 8)) > 0


def _auth(srv: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.secrets['team']}"}


def _ledger_completion_tokens(srv: Any) -> int:
    srv.services.ledger.flush()
    db = sqlite3.connect(srv.services.settings.home.ledger)
    try:
        (total,) = db.execute("SELECT COALESCE(SUM(completion_tokens), 0) FROM requests").fetchone()
    finally:
        db.close()
    return int(total)


def _audit(srv: Any) -> list[dict[str, Any]]:
    srv.services.audit.flush()
    path = srv.services.settings.home.audit_log
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_replicas_autoscale_up_under_load_and_back_down(
    cluster: Any, smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from freehold.cluster.ray_serve import Autoscale

    auto = Autoscale(min_replicas=1, max_replicas=2, target_ongoing=1, downscale_delay_s=3)
    plan = ClusterPlan(address=cluster.address, autoscale=auto)
    home = tmp_path_factory.mktemp("autoscale")
    with running_server(home, {"smol-auto": smollm2_path}, cluster=plan, slots=4) as srv:
        eng = srv.services.registry.engine("smol-auto")
        assert len(eng.replica_nodes()) == 1
        stop = threading.Event()

        def load() -> None:
            c = OpenAI(base_url=srv.v1, api_key="none", max_retries=0, timeout=120)
            while not stop.is_set():
                c.chat.completions.create(model="smol-auto", messages=PROMPT, max_tokens=48)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            _wait_for(lambda: len(eng.replica_nodes()) == 2, 45, "no second replica under load")
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=120)
        _wait_for(lambda: len(eng.replica_nodes()) == 1, 60, "no scale-down after the load")


def _wait_for(check: Any, seconds: float, why: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, why
        time.sleep(0.5)
