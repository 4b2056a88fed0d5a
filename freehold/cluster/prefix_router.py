"""Prefix-aware routing: a request goes to the replica that already holds its prompt's prefix.

Requests that share a long prefix (a system prompt, a conversation's history) are cheap on the
replica that computed it last (its slots and prompt cache hold the KV) and expensive anywhere
else. The router remembers, per block of prompt tokens (chained hashes, as vLLM's prefix cache
names its blocks), which replica it last sent that prefix to. A new request goes to the replica
holding its longest known prefix, unless that replica has `imbalance` more requests in flight
than the least loaded one; then load wins, and the prefix is recomputed where there is room.

`PrefixTable` and `rank` are the pure part; `PrefixAffinityRouter` plugs them into Ray Serve's
public request-router interface (Ray's own prefix router is private, and Ray's LLM one needs
vLLM). Imported only under `serve --cluster`, where Ray is installed.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from ray.serve.request_router import FIFOMixin, RequestRouter

BLOCK_TOKENS = 64
TABLE_BLOCKS = 65_536
IMBALANCE = 4


def block_hashes(tokens: Sequence[int], block: int = BLOCK_TOKENS) -> list[int]:
    """One hash per full block of `tokens`, each covering every token before it too."""
    out: list[int] = []
    h = 0
    for start in range(0, len(tokens) - block + 1, block):
        h = hash((h, tuple(tokens[start : start + block])))
        out.append(h)
    return out


class PrefixTable:
    """Which replica last took each prefix block (least recently used blocks forgotten)."""

    def __init__(self, capacity: int = TABLE_BLOCKS, block: int = BLOCK_TOKENS) -> None:
        self.capacity = capacity
        self.block = block
        self._owner: OrderedDict[int, Hashable] = OrderedDict()

    def owner(self, tokens: Sequence[int], live: set[Hashable]) -> tuple[Hashable | None, int]:
        """The live replica holding the longest known prefix of `tokens`, and its length in
        blocks (None, 0 when no live replica holds any)."""
        best: tuple[Hashable | None, int] = (None, 0)
        for n, h in enumerate(block_hashes(tokens, self.block), start=1):
            replica = self._owner.get(h)
            if replica is None:
                break
            if replica in live:
                best = (replica, n)
        return best

    def record(self, tokens: Sequence[int], replica: Hashable) -> None:
        for h in block_hashes(tokens, self.block):
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]


def rank(
    candidates: Sequence[Hashable],
    load: Counter[Hashable],
    preferred: Hashable | None,
    imbalance: int = IMBALANCE,
) -> list[list[Hashable]]:
    """Candidates in the order to try them: the prefix's holder first unless it is too busy,
    then the rest, least loaded first. Equal loads are shuffled: a burst routed before any of
    its requests is counted must not all go to one replica."""
    by_load = sorted(candidates, key=lambda r: (load[r], random.random()))
    if preferred is None or preferred not in candidates:
        return [[r] for r in by_load]
    if load[preferred] - load[by_load[0]] > imbalance:
        return [[r] for r in by_load]
    return [[preferred]] + [[r] for r in by_load if r != preferred]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """`PrefixTable` and `rank` as a Ray Serve request router (runs in the gateway's process,
    where the deployment handle lives)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._table = PrefixTable(
            kwargs.get("capacity", TABLE_BLOCKS), kwargs.get("block", BLOCK_TOKENS)
        )
        self._imbalance = int(kwargs.get("imbalance", IMBALANCE))
        self._inflight: Counter[Hashable] = Counter()
        self._routed: dict[str, Hashable] = {}

    async def choose_replicas(
        self, candidate_replicas: list[Any], pending_request: Any = None
    ) -> list[list[Any]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        preferred = None
        if pending_request is not None and pending_request.args:
            preferred, _ = self._table.owner(pending_request.args[0], set(by_id))
        order = rank(list(by_id), self._inflight, preferred, self._imbalance)
        return [[by_id[rid] for rid in tier] for tier in order]

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        if pending_request.args:
            self._table.record(pending_request.args[0], replica_id)
        self._inflight[replica_id] += 1
        self._routed[pending_request.metadata.internal_request_id] = replica_id

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        if self._routed.pop(internal_request_id, None) is not None:
            self._inflight[replica_id] = max(self._inflight[replica_id] - 1, 0)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._table.forget(replica_id)
        self._inflight.pop(replica_id, None)
