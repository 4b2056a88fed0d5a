"""The cluster's pure parts: model shipping by content address (with a chunk corrupted in
transit) and the prefix router's table and ranking. The real cluster is in test_cluster_ray.py."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freehold.cluster import shipping
from freehold.cluster.prefix_router import PrefixTable, block_hashes, rank
from freehold.errors import IntegrityError


def _source(path: Path, corrupt: dict[int, int]) -> shipping.ReadChunk:
    """The gateway's chunks; `corrupt[i]` deliveries of chunk i arrive with a byte flipped."""
    source = shipping.BlobSource()
    blob = shipping.describe(path)
    source.offer(blob.sha256, str(path))

    def read(index: int) -> tuple[bytes, str]:
        data, digest = source.chunk(blob.sha256, index)
        if corrupt.get(index, 0) > 0:
            corrupt[index] -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data, digest

    return read


@pytest.fixture
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(shipping, "CHUNK_BYTES", 4096)
    path = tmp_path / "model.gguf"
    path.write_bytes(hashlib.sha256(b"seed").digest() * 1000)  # 32,000 bytes: 8 chunks
    return path


def test_a_node_fetches_a_model_verified_and_keeps_it(weights: Path, tmp_path: Path) -> None:
    blob = shipping.describe(weights)
    cache = tmp_path / "node-cache"
    got = shipping.fetch(blob, _source(weights, {}), cache)
    assert got == cache / f"sha256-{blob.sha256}"
    assert got.read_bytes() == weights.read_bytes()

    def unreachable(index: int) -> tuple[bytes, str]:
        raise AssertionError("a cached model is not fetched again")

    assert shipping.fetch(blob, unreachable, cache) == got


def test_a_chunk_corrupted_in_transit_is_refused_and_fetched_again(
    weights: Path, tmp_path: Path
) -> None:
    blob = shipping.describe(weights)
    corrupt = {3: 1, 7: 2}
    got = shipping.fetch(blob, _source(weights, corrupt), tmp_path / "c")
    assert corrupt == {3: 0, 7: 0}  # each bad delivery was seen, and asked for again
    assert got.read_bytes() == weights.read_bytes()


def test_a_chunk_that_never_arrives_intact_leaves_nothing(weights: Path, tmp_path: Path) -> None:
    blob = shipping.describe(weights)
    cache = tmp_path / "c"
    with pytest.raises(IntegrityError, match="chunk 2 of model.gguf arrived corrupted"):
        shipping.fetch(blob, _source(weights, {2: 99}), cache)
    assert list(cache.iterdir()) == []


def test_vault_blobs_are_addressed_by_their_names(tmp_path: Path) -> None:
    digest = "ab" * 32
    path = tmp_path / f"sha256-{digest}"
    path.write_bytes(b"not hashed again")
    assert shipping.describe(path).sha256 == digest


tokens = st.lists(st.integers(0, 50), max_size=300)


@given(a=tokens, b=tokens)
def test_the_owner_is_whoever_took_the_longest_shared_prefix(a: list[int], b: list[int]) -> None:
    table = PrefixTable(block=8)
    table.record(a, "r1")
    table.record(b, "r2")
    owner, blocks = table.owner(a, {"r1", "r2"})
    shared = 0
    for x, y in zip(block_hashes(a, 8), block_hashes(b, 8), strict=False):
        if x != y:
            break
        shared += 1
    full = len(a) // 8
    if full == 0:
        assert (owner, blocks) == (None, 0)
    elif shared == full:
        assert (owner, blocks) == ("r2", full)  # b re-took all of a's blocks last
    else:
        assert (owner, blocks) == ("r1", full)
    assert table.owner(a, {"r3"}) == (None, 0)  # dead replicas own nothing


def test_the_table_forgets_least_recently_used_blocks() -> None:
    table = PrefixTable(capacity=4, block=2)
    table.record([1, 2, 3, 4, 5, 6], "old")
    table.record([9, 9, 8, 8], "new")
    assert table.owner([1, 2], {"old", "new"}) == (None, 0)
    assert table.owner([9, 9, 8, 8], {"old", "new"}) == ("new", 2)


def test_load_wins_over_the_prefix_only_past_the_imbalance() -> None:
    load = Counter({"a": 5, "b": 1})
    assert rank(["a", "b"], load, "a", imbalance=4) == [["a"], ["b"]]
    load["a"] = 6
    assert rank(["a", "b"], load, "a", imbalance=4) == [["b"], ["a"]]
    assert rank(["a", "b"], load, None) == [["b"], ["a"]]


def test_events_are_coalesced_to_one_message_per_window() -> None:
    import asyncio

    from freehold.cluster.replica import coalesced
    from freehold.engine import Delta, Finished, Timings, Usage

    async def events(gaps: list[float]):  # noqa: ANN202
        for gap in gaps:
            await asyncio.sleep(gap)
            yield Delta("x", (1,))
        yield Finished("stop", Usage(1, len(gaps), 0), Timings(0, 0, 0, 0, 0))

    async def run(gaps: list[float]) -> list[int]:
        return [len(b) async for b in coalesced(events(gaps), 0.05)]

    # Slow tokens (every 80 ms) go one by one; the first never waits.
    assert asyncio.run(run([0.0, 0.08, 0.08])) == [1, 1, 1, 1]
    # Fast tokens (every 5 ms) travel together: the first alone, then one message a window.
    sizes = asyncio.run(run([0.005] * 40))
    assert sizes[0] == 1 and sum(sizes) == 41 and len(sizes) <= 8, sizes


def test_equal_loads_spread_a_burst() -> None:
    firsts = Counter(rank(["a", "b"], Counter(), None)[0][0] for _ in range(200))
    assert set(firsts) == {"a", "b"} and min(firsts.values()) > 50
