"""The gateway's side of a Ray cluster: connect, deploy each served model with Ray Serve, and
give the model pool engines whose replicas run on the cluster's nodes.

Freehold does not manage the cluster: users start Ray themselves (`ray start --head`, then
`ray start --address=HEAD:6379` on each node) and `freehold serve --cluster ADDRESS|auto`
attaches to it. Serve places and replaces replicas (one per node by default); Freehold's gateway
stays the single writer of keys, quotas, the ledger and the audit log, and its Serve proxy is
off: clients only ever talk to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freehold.cluster import shipping
from freehold.cluster.replica import EngineReplica, ReplicaSpec
from freehold.engine import EngineConfig
from freehold.errors import FreeholdError, InvalidInput

log = logging.getLogger(__name__)

_QUIET_LOGS = {"log_level": "WARNING", "enable_access_log": False}


@dataclass(frozen=True)
class Autoscale:
    """Serve's autoscaling: replicas between min and max, aiming at `target_ongoing` requests
    in flight per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing: float = 4.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 60.0

    def check(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InvalidInput(
                f"--min-replicas {self.min_replicas} and --max-replicas {self.max_replicas}: "
                "need 1 <= min <= max"
            )
        if self.target_ongoing <= 0:
            raise InvalidInput(f"--target-ongoing must be above 0, got {self.target_ongoing}")


@dataclass(frozen=True)
class ClusterPlan:
    """How `serve --cluster` runs its models: where, how many replicas, how big each is."""

    address: str  # a Ray address (HOST:PORT, ray://…) or "auto"
    replicas: int | None = None  # fixed count; None: one per alive node (or autoscaled)
    autoscale: Autoscale | None = None
    num_cpus: float = 1.0
    node_cache: Path = shipping.DEFAULT_NODE_CACHE
    cache_ram_bytes: int | None = None


def parse_replicas(text: str | None) -> tuple[int | None, bool]:
    """`--replicas N|auto` -> (fixed count or None, autoscale?)."""
    if text is None or text == "":
        return None, False
    if text == "auto":
        return None, True
    if text.isdigit() and int(text) >= 1:
        return int(text), False
    raise InvalidInput(f"--replicas takes a count (1, 2, ...) or 'auto', got {text!r}")


def cluster_plan(
    address: str | None,
    replicas: str | None,
    autoscale: Autoscale,
    *,
    threads: int | None = None,
    node_cache: Path | None = None,
    cache_ram_bytes: int | None = None,
) -> ClusterPlan | None:
    """`serve`'s cluster options as a plan; None without `--cluster`."""
    if address is None:
        if replicas is not None:
            raise InvalidInput("--replicas needs --cluster ADDRESS|auto (a Ray cluster to run on)")
        return None
    if not address.strip():
        raise InvalidInput("--cluster takes a Ray address (HOST:PORT) or 'auto'")
    count, auto = parse_replicas(replicas)
    if auto:
        autoscale.check()
    return ClusterPlan(
        address=address.strip(),
        replicas=count,
        autoscale=autoscale if auto else None,
        num_cpus=float(threads or 1),
        node_cache=node_cache or shipping.DEFAULT_NODE_CACHE,
        cache_ram_bytes=cache_ram_bytes,
    )


def _check_reachable(address: str) -> None:
    """Refuse at once when nothing listens at a HOST:PORT address (ray.init would retry for
    minutes, printing its own log lines)."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInput(
            f"--cluster takes HOST:PORT (e.g. 10.0.0.1:6379) or 'auto', got {address!r}"
        )
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise FreeholdError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
            "`ray start --head --port=6379` and pass HEAD:6379 (or 'auto' on one of its nodes)"
        ) from None


def deployment_name(model: str) -> str:
    return "freehold-" + re.sub(r"[^A-Za-z0-9_-]", "_", model)


class RayCluster:
    """One gateway's connection to a Ray cluster and the Serve applications it deployed."""

    def __init__(self, plan: ClusterPlan) -> None:
        import ray
        from ray import serve

        self.plan = plan
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry
        if not ray.is_initialized():
            _check_reachable(plan.address)
            try:
                ray.init(address=plan.address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise FreeholdError(
                    f"could not connect to a Ray cluster at {plan.address!r} ({e}); start one "
                    "with `ray start --head` and pass its address (or 'auto' on a node of it)"
                ) from None
        self.node_id = ray.get_runtime_context().get_node_id()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not a line per deployment
        serve.start(proxy_location="Disabled", logging_config=_QUIET_LOGS)
        self.source = self._start_source()
        self._offered: dict[str, str] = {}
        self._apps: dict[str, str] = {}  # model -> Serve application
        self.replica_targets: dict[str, int] = {}  # model -> replicas it runs (at most)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="freehold-cluster", daemon=True
        )
        self._thread.start()

    def _start_source(self) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=self.node_id, soft=False)
        actor = ray.remote(num_cpus=0)(shipping.BlobSource)
        return actor.options(scheduling_strategy=here).remote()

    # -- deployments ---------------------------------------------------------------------------

    def deploy(self, model: str, weights: Path, config: EngineConfig) -> Any:
        """Deploy `model`'s replicas and wait until they run; its Serve handle."""
        from ray import serve

        blobs = [self._offer(Path(p)) for p in (weights, *config.adapters)]
        spec = ReplicaSpec(
            model=model,
            weights=blobs[0],
            adapters=tuple(blobs[1:]),
            gateway_paths=dict(self._offered),
            gateway_node=self.node_id,
            config=config,
            cache_ram_bytes=self.plan.cache_ram_bytes,
            node_cache=str(self.plan.node_cache),
        )
        name = deployment_name(model)
        options = self._options(config)
        deployment = serve.deployment(EngineReplica).options(name=name, **options)
        serve.run(deployment.bind(spec, self.source), name=name, route_prefix=None)
        self._apps[model] = name
        auto = self.plan.autoscale
        self.replica_targets[model] = auto.max_replicas if auto else options["num_replicas"]
        return serve.get_deployment_handle(name, app_name=name)

    def _offer(self, path: Path) -> shipping.Blob:
        import ray

        blob = shipping.describe(path)
        if blob.sha256 not in self._offered:
            ray.get(self.source.offer.remote(blob.sha256, str(path.resolve())))
            self._offered[blob.sha256] = str(path.resolve())
        return blob

    def _options(self, config: EngineConfig) -> dict[str, Any]:
        plan = self.plan
        # A replica admits what the gateway lets through (its slots and queue); beyond that
        # the gateway has already answered 429.
        ongoing = (config.n_slots or 8) + config.max_queue
        opts: dict[str, Any] = {
            "max_replicas_per_node": 1,
            "max_ongoing_requests": ongoing,
            "ray_actor_options": {"num_cpus": plan.num_cpus, "num_gpus": self._gpus(config)},
            "logging_config": _QUIET_LOGS,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 10.0,
            "graceful_shutdown_timeout_s": 5.0,
            "request_router_config": {
                "request_router_class": "freehold.cluster.prefix_router:PrefixAffinityRouter"
            },
        }
        if plan.autoscale is not None:
            a = plan.autoscale
            opts["autoscaling_config"] = {
                "min_replicas": a.min_replicas,
                "initial_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.target_ongoing,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2.0,
            }
        else:
            opts["num_replicas"] = plan.replicas or len(self.alive_nodes())
        return opts

    def _gpus(self, config: EngineConfig) -> float:
        import ray

        if config.gpu_layers == 0:
            return 0.0
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def undeploy(self, model: str) -> None:
        from ray import serve

        name = self._apps.pop(model, None)
        if name is not None:
            with contextlib.suppress(Exception):
                serve.delete(name)

    # -- what runs where -----------------------------------------------------------------------

    def alive_nodes(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]

    def replica_nodes(self, model: str) -> list[str]:
        """The node ids the model's running replicas are on."""
        from ray.util.state import list_actors

        prefix = f"ServeReplica:{deployment_name(model)}:"
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
        return sorted(a.node_id for a in actors if a.class_name.startswith(prefix))

    def close(self) -> None:
        """Delete this gateway's applications; the cluster itself keeps running."""
        import ray

        for model in list(self._apps):
            self.undeploy(model)
        with contextlib.suppress(Exception):
            ray.kill(self.source)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
