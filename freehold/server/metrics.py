"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide).

Queue depths are read from the engines at scrape time (a custom collector), so they are never
stale; latencies and token counts are observed as requests finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from freehold.engine import CacheStats, EngineStats, Usage

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)


class _EngineCollector(Collector):
    def __init__(
        self,
        stats: Callable[[], Iterable[EngineStats]],
        cache_stats: Callable[[], CacheStats | None],
    ) -> None:
        self._stats = stats
        self._cache_stats = cache_stats

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            "freehold_requests_running", "Requests holding a slot", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "freehold_requests_waiting", "Requests queued for a slot", labels=["model"]
        )
        slots = GaugeMetricFamily("freehold_slots", "Sequence slots", labels=["model"])
        compute = CounterMetricFamily(
            "freehold_engine_compute_seconds",
            "Seconds inside llama.cpp computing batches; its rate is the engine's busy share",
            labels=["model"],
        )
        share = GaugeMetricFamily(
            "freehold_prompt_cache_share",
            "Share of prompt tokens served from cache (slots or host memory) since load",
            labels=["model"],
        )
        hits = CounterMetricFamily(
            "freehold_prompt_cache_hits",
            "Requests whose prefix was restored from the host-memory prompt cache",
            labels=["model"],
        )
        misses = CounterMetricFamily(
            "freehold_prompt_cache_misses",
            "Requests for which the host-memory prompt cache held no longer prefix than the slots",
            labels=["model"],
        )
        for st in self._stats():
            running.add_metric([st.model], st.running)
            waiting.add_metric([st.model], st.queued)
            slots.add_metric([st.model], st.slots)
            compute.add_metric([st.model], st.compute_seconds)
            share.add_metric([st.model], st.cached_share)
            hits.add_metric([st.model], st.prompt_cache_hits)
            misses.add_metric([st.model], st.prompt_cache_misses)
        yield from (running, waiting, slots, compute, share, hits, misses)
        yield from self._cache_families()

    def _cache_families(self) -> Iterable[Metric]:
        cs = self._cache_stats()
        if cs is None:
            return
        yield GaugeMetricFamily(
            "freehold_prompt_cache_bytes", "Bytes of saved KV state in host memory", value=cs.bytes
        )
        yield GaugeMetricFamily(
            "freehold_prompt_cache_budget_bytes",
            "Host memory the prompt cache may use (--cache-ram)",
            value=cs.budget_bytes,
        )
        yield GaugeMetricFamily(
            "freehold_prompt_cache_entries", "Saved conversations in host memory", value=cs.entries
        )
        yield CounterMetricFamily(
            "freehold_prompt_cache_evictions",
            "Saved conversations dropped to stay within the budget",
            value=cs.evictions,
        )


class Metrics:
    def __init__(
        self,
        engine_stats: Callable[[], Iterable[EngineStats]],
        cache_stats: Callable[[], CacheStats | None] = lambda: None,
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        r.register(_EngineCollector(engine_stats, cache_stats))
        self.requests = Counter(
            "freehold_requests",
            "API requests by model, endpoint and HTTP status",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "freehold_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "freehold_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "freehold_request_duration_seconds",
            "Time from arrival to the last byte",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "freehold_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "freehold_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.cache_hit_tokens = Counter(
            "freehold_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache instead of recomputed",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "freehold_prefix_cache_hits",
            "Requests that reused a cached prefix",
            ["model"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "freehold_model_load_seconds",
            "Seconds the last load (and warm-up) of a model took",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "freehold_requests_rejected",
            "Requests refused at admission (queue full, rate limit, loading, draining)",
            ["model", "reason"],
            registry=r,
        )
        self.failovers = Counter(
            "freehold_failovers",
            "Requests resumed on another replica after theirs was lost (serve --cluster)",
            ["model"],
            registry=r,
        )

    def observe_generation(
        self, model: str, usage: Usage, ttft_s: float | None, decode_s: float
    ) -> None:
        """One finished choice: its tokens, cache use and latencies."""
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.generation_tokens.labels(model).inc(usage.completion_tokens)
        if usage.cached_tokens:
            self.cache_hits.labels(model).inc()
            self.cache_hit_tokens.labels(model).inc(usage.cached_tokens)
        if ttft_s is not None and usage.completion_tokens:
            self.ttft.labels(model).observe(ttft_s)
        if usage.completion_tokens > 1 and decode_s > 0:
            self.tpot.labels(model).observe(decode_s / (usage.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
