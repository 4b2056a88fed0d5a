"""Routing between upstreams, as pure logic: `--upstream` syntax, load from /metrics text,
least-loaded choice, and cooldowns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freehold.cluster.routing import (
    COOLDOWN_BASE_S,
    COOLDOWN_CAP_S,
    Load,
    UpstreamSpec,
    UpstreamState,
    choose,
    groups,
    parse_load,
    parse_upstream,
    parse_upstreams,
)
from freehold.errors import InvalidInput


def _state(name: str, load: Load | None = None, inflight: int = 0) -> UpstreamState:
    s = UpstreamState(UpstreamSpec(name, f"http://{name}:8000/v1", "m"), load=load)
    s.inflight = inflight
    return s


# -- --upstream syntax -------------------------------------------------------------------------


def test_parse_upstream_options_and_defaults() -> None:
    s = parse_upstream("gpu1=http://10.0.0.5:8000,model=llama,key=sk-x,price=openai gpt-4o,slots=8")
    assert (s.name, s.url, s.model, s.key, s.price, s.slots) == (
        "gpu1",
        "http://10.0.0.5:8000/v1",
        "llama",
        "sk-x",
        "openai gpt-4o",
        8,
    )
    assert s.root == "http://10.0.0.5:8000"
    assert "sk-x" not in repr(s)
    bare = parse_upstream("gpt-4o-mini=https://api.example.com/v1/")
    assert (bare.url, bare.model, bare.key) == ("https://api.example.com/v1", "gpt-4o-mini", None)


@pytest.mark.parametrize(
    "bad",
    [
        "http://host:8000",  # no name
        "a=",  # no URL
        "a=ftp://host",  # not http(s)
        "a=http://",  # no host
        "a=http://h,model",  # option without a value
        "a=http://h,colour=red",  # unknown option
        "a=http://h,slots=0",
        "a=http://h,slots=many",
    ],
)
def test_bad_upstreams_are_refused_with_an_example(bad: str) -> None:
    with pytest.raises(InvalidInput, match=r"NAME=URL.*e\.g\. --upstream"):
        parse_upstream(bad)


def test_names_are_unique_and_groups_form_by_model() -> None:
    with pytest.raises(InvalidInput, match="used twice"):
        parse_upstreams(["a=http://h1", "a=http://h2"])
    with pytest.raises(InvalidInput, match="one price"):
        parse_upstreams(["a=http://h1,model=m,price=x y", "b=http://h2,model=m,price=z w"])
    specs = parse_upstreams(["a=http://h1,model=m", "b=http://h2,model=m", "c=http://h3"])
    assert {k: [s.name for s in v] for k, v in groups(specs).items()} == {
        "m": ["a", "b"],
        "c": ["c"],
    }


# -- load from /metrics ------------------------------------------------------------------------

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="llama"} 3.0
vllm:num_requests_running{model_name="other"} 9.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="llama"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="llama"} 0.25
"""

FREEHOLD = """\
# TYPE freehold_requests_running gauge
freehold_requests_running{model="smollm2"} 1.0
freehold_requests_running{model="gemma"} 4.0
# TYPE freehold_requests_waiting gauge
freehold_requests_waiting{model="smollm2"} 0.0
freehold_requests_waiting{model="gemma"} 2.0
"""


def test_parse_load_reads_vllm_and_freehold_gauges() -> None:
    assert parse_load(VLLM, "llama") == Load(running=3, waiting=2, kv_usage=0.25)
    assert parse_load(FREEHOLD, "smollm2") == Load(running=1, waiting=0)
    # A model the labels do not name: the whole server's load.
    assert parse_load(FREEHOLD, "served-under-another-name") == Load(running=5, waiting=2)
    assert parse_load("# TYPE up gauge\nup 1\n", "m") is None


# -- choosing ----------------------------------------------------------------------------------


def test_least_loaded_wins_and_waiting_weighs_most() -> None:
    a = _state("a", Load(running=4, waiting=0))
    b = _state("b", Load(running=0, waiting=3))
    assert choose([a, b], now=0) is a
    no_metrics = _state("c", None, inflight=1)
    assert choose([a, b, no_metrics], now=0) is no_metrics
    # Requests sent since the last reading count until the next poll shows them.
    for _ in range(5):
        no_metrics.sent()
    assert choose([a, b, no_metrics], now=0) is a


def test_ties_go_to_the_least_used() -> None:
    a, b = _state("a"), _state("b")
    picks = []
    for _ in range(4):
        s = choose([a, b], now=0)
        assert s is not None
        s.sent()
        s.ended()
        picks.append(s.name)
    assert picks == ["a", "b", "a", "b"]


def test_cooldown_doubles_to_a_cap_and_clears_on_success() -> None:
    s = _state("a")
    waits = [s.failed(now=100, why="refused") for _ in range(6)]
    assert waits == [min(COOLDOWN_BASE_S * 2**i, COOLDOWN_CAP_S) for i in range(6)]
    assert not s.healthy(100 + COOLDOWN_CAP_S - 1) and s.healthy(100 + COOLDOWN_CAP_S)
    assert s.describe(101)["state"] == "cooling down"
    s.polled(Load())
    assert s.healthy(101) and s.failures == 0 and s.describe(101)["state"] == "healthy"


def test_cooling_upstreams_are_skipped_unless_all_are() -> None:
    a, b, c = _state("a"), _state("b", Load(waiting=9)), _state("c")
    a.failed(now=0, why="x")
    assert choose([a, b], now=1) is b  # loaded, but up
    c.failed(now=0, why="x")
    c.failed(now=0, why="x")  # out longer than a
    assert choose([a, c], now=1) is a  # all down: the one back first
    assert choose([a, b], now=1, exclude=["b"]) is a
    assert choose([a, b], now=1, exclude=["a", "b"]) is None


loads = st.one_of(
    st.none(),
    st.builds(
        Load,
        running=st.integers(0, 50).map(float),
        waiting=st.integers(0, 50).map(float),
        kv_usage=st.floats(0, 1),
    ),
)


@given(
    st.lists(st.tuples(loads, st.integers(0, 20), st.booleans()), min_size=1, max_size=6),
    st.sets(st.integers(0, 5)),
)
def test_choice_is_a_least_loaded_healthy_candidate(
    rows: list[tuple[Load | None, int, bool]], excluded: set[int]
) -> None:
    states = []
    for i, (load, inflight, down) in enumerate(rows):
        s = _state(f"u{i}", load, inflight)
        if down:
            s.failed(now=0, why="x")
        states.append(s)
    exclude = [f"u{i}" for i in excluded]
    pick = choose(states, now=1, exclude=exclude)
    candidates = [s for s in states if s.name not in exclude]
    if not candidates:
        assert pick is None
        return
    assert pick in candidates
    healthy = [s for s in candidates if s.healthy(1)]
    if healthy:
        assert pick in healthy and pick.score() == min(s.score() for s in healthy)
