"""`freehold serve --cluster` against plain `freehold serve` on one node, and the cost of one
message through a Ray Serve stream.

A one-node Ray cluster (ray.cluster_utils on 127.0.0.1, 2 CPUs) runs beside two servers on the
same SmolLM2: plain `freehold serve`, and `freehold serve --cluster ADDRESS`, whose one replica
runs the same engine in a Serve actor and streams to the gateway through a Serve handle. Both
have 8 slots, 2 threads, 1024 tokens of context. Closed-loop streaming /v1/completions at
concurrency 8, 16 distinct prompts of 48 words, 128 output tokens each (EOS ignored); the two
servers' levels are interleaved, `ROUNDS` times, and the medians compared.

The per-message cost: a Serve deployment on that node streams 2,000 empty messages to this
process through a handle; the same loop over a plain async generator is the baseline.

    python -m benchmarks.bench_cluster [ROUNDS]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.common import ServerProcess, free_port, machine, median, smollm2_path
from freehold.measure import loadgen
from freehold.measure.loadgen import Target

ROUNDS = 3
CONCURRENCY = 8
PROMPTS = 16
OUTPUT_TOKENS = 128
MESSAGES = 2000


def main(argv: list[str] | None = None) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the node on 127.0.0.1
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    rounds = int(argv[0]) if argv else ROUNDS
    print(f"Machine: {machine()}")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        with (
            tempfile.TemporaryDirectory(prefix="freehold-bench-cluster-") as work,
            ExitStack() as stack,
        ):
            servers = [stack.enter_context(s) for s in _servers(Path(work), cluster.address)]
            _throughput(servers, rounds)
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            _per_message()
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()


def _servers(work: Path, address: str) -> list[ServerProcess]:
    model = str(smollm2_path())
    common = ["--model", model, "--slots", "8", "--threads", "2", "--ctx", "1024"]
    out = []
    for name, extra in (
        ("freehold serve", []),
        ("freehold serve --cluster", ["--cluster", address]),
    ):
        port = free_port()
        home = work / name.replace(" ", "_")
        cmd = [sys.executable, "-m", "freehold", "serve", *common, *extra, "--port", str(port)]
        env = {**os.environ, "FREEHOLD_HOME": str(home)}
        out.append(ServerProcess(name, cmd, port, work / f"{port}.log", env=env))
    return out


def _throughput(servers: list[ServerProcess], rounds: int) -> None:
    prompts = loadgen.synthetic_prompts(PROMPTS, 48, OUTPUT_TOKENS, seed=5)
    tok_s: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(rounds):
        for s in servers:
            level = loadgen.run_level(Target(s.url, s.model), prompts, concurrency=CONCURRENCY)
            assert level.summary.failed == 0, level.summary.first_error
            tok_s[s.name].append(level.summary.output_throughput)
    plain, clustered = (median(tok_s[s.name]) for s in servers)
    print(f"\n{rounds} interleaved rounds, concurrency {CONCURRENCY}, medians\n")
    print("| server | output tok/s (median) | rounds | ratio |")
    print("|---|---|---|---|")
    for s, value in zip(servers, (plain, clustered), strict=True):
        rounds_text = ", ".join(f"{v:.1f}" for v in tok_s[s.name])
        print(f"| {s.name} | {value:.1f} | {rounds_text} | {value / plain:.2f}x |", flush=True)


def _per_message() -> None:
    from ray import serve

    @serve.deployment(
        ray_actor_options={"num_cpus": 0},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    class Messages:
        async def stream(self, n: int):  # noqa: ANN202
            for _ in range(n):
                yield []

    handle = serve.run(Messages.bind(), name="bench-messages", route_prefix=None)

    async def through_serve() -> float:
        t0 = time.perf_counter()
        async for _ in handle.options(stream=True).stream.remote(MESSAGES):
            pass
        return (time.perf_counter() - t0) / MESSAGES

    async def local() -> float:
        async def gen():  # noqa: ANN202
            for _ in range(MESSAGES):
                yield []

        t0 = time.perf_counter()
        async for _ in gen():
            pass
        return (time.perf_counter() - t0) / MESSAGES

    serve_s = median([asyncio.run(through_serve()) for _ in range(3)])
    local_s = median([asyncio.run(local()) for _ in range(3)])
    serve.delete("bench-messages")
    print("\n| path | per message (median of 3 x 2,000) |")
    print("|---|---|")
    print(f"| Serve handle stream, same node | {serve_s * 1e3:.3f} ms |")
    print(f"| plain async generator | {local_s * 1e3:.4f} ms |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
