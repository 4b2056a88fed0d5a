"""Upstreams as routing sees them: what `--upstream` names, how loaded each one is, whether it
is healthy, and which one of a group gets the next request.

Pure logic, no I/O: `freehold/cluster/upstream.py` polls and streams, and calls in here.

Load comes from an upstream's Prometheus `/metrics` where it has them (vLLM's
`vllm:num_requests_running|waiting` and `vllm:kv_cache_usage_perc`, or Freehold's own
`freehold_requests_running|waiting`), plus the requests sent to it since that reading; an
upstream without metrics (a hosted API, llama-server without `--metrics`) is judged by the
requests this gateway has in flight on it. A failed request or poll cools an upstream down
for a while (doubling on each failure, to a cap); routing skips it until then.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from freehold.errors import InvalidInput

COOLDOWN_BASE_S = 5.0
COOLDOWN_CAP_S = 60.0
DEFAULT_SLOTS = 32  # requests one upstream takes before the gateway queues (it may queue more)

_EXAMPLE = "a=http://10.0.0.5:8000/v1,model=llama-3.1-8b,key=sk-…"
_OPTIONS = ("model", "key", "price", "slots")

_RUNNING = ("vllm:num_requests_running", "freehold_requests_running")
_WAITING = ("vllm:num_requests_waiting", "freehold_requests_waiting")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


# -- what --upstream names ---------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamSpec:
    """One `--upstream NAME=URL[,model=M][,key=K][,price=ROW][,slots=N]`."""

    name: str
    url: str  # the OpenAI base, ending in /v1
    model: str  # the id clients use here, and the model asked for upstream
    key: str | None = None
    price: str | None = None  # a price sheet row ("provider model") its tokens cost
    slots: int = DEFAULT_SLOTS

    @property
    def root(self) -> str:
        """The server's root, where /metrics lives (vLLM, llama-server, Freehold)."""
        return self.url.removesuffix("/v1")

    def __repr__(self) -> str:  # never print the key
        return f"UpstreamSpec({self.name}={self.url}, model={self.model})"


def _bad(item: str, why: str) -> InvalidInput:
    return InvalidInput(
        f"--upstream {item!r}: {why}. It takes NAME=URL[,model=M][,key=K][,price=ROW]"
        f"[,slots=N], e.g. --upstream {_EXAMPLE}"
    )


def parse_upstream(item: str) -> UpstreamSpec:
    head, *opts = (part.strip() for part in item.split(","))
    name, sep, url = (p.strip() for p in head.partition("="))
    if not sep or not name or not url:
        raise _bad(item, "it must start with NAME=URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(item, f"{url!r} is not an http(s) URL")
    values: dict[str, str] = {}
    for opt in opts:
        k, sep, v = (p.strip() for p in opt.partition("="))
        if k not in _OPTIONS or not sep or not v:
            raise _bad(item, f"unknown or empty option {opt!r} (known: {', '.join(_OPTIONS)})")
        values[k] = v
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    slots = values.get("slots", str(DEFAULT_SLOTS))
    if not slots.isdigit() or int(slots) < 1:
        raise _bad(item, f"slots must be a whole number of at least 1, got {slots!r}")
    return UpstreamSpec(
        name=name,
        url=base,
        model=values.get("model", name),
        key=values.get("key"),
        price=values.get("price"),
        slots=int(slots),
    )


def parse_upstreams(items: Iterable[str]) -> list[UpstreamSpec]:
    """Every `--upstream`; names must be unique (they label metrics and /ready)."""
    out: list[UpstreamSpec] = []
    for item in items:
        spec = parse_upstream(item)
        if any(s.name == spec.name for s in out):
            raise _bad(item, f"the name {spec.name!r} is used twice; give each upstream its own")
        priced = [s.price for s in out if s.model == spec.model and s.price is not None]
        if spec.price is not None and priced and priced[0] != spec.price:
            raise _bad(
                item,
                f"{spec.model} is priced {priced[0]!r} by another upstream: the ledger does not "
                "say which upstream served a request, so give its group one price",
            )
        out.append(spec)
    return out


def groups(specs: Iterable[UpstreamSpec]) -> dict[str, list[UpstreamSpec]]:
    """Served model id -> the upstreams that serve it, in the order given."""
    out: dict[str, list[UpstreamSpec]] = {}
    for s in specs:
        out.setdefault(s.model, []).append(s)
    return out


# -- load --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """One reading of an upstream's /metrics."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1


def parse_load(text: str, model: str) -> Load | None:
    """The load in a Prometheus exposition, counting only `model`'s series where they are
    labelled by model (vLLM's `model_name`, Freehold's `model`); None: no known gauges."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in _RUNNING + _WAITING + _KV_USAGE:
            found.setdefault(fam.name, []).extend((s.labels, s.value) for s in fam.samples)
    if not found:
        return None

    def total(names: tuple[str, ...], agg: str = "sum") -> float:
        samples = [x for n in names for x in found.get(n, [])]
        mine = [
            v for labels, v in samples if model in (labels.get("model_name"), labels.get("model"))
        ]
        values = mine or [v for _, v in samples]
        if not values:
            return 0.0
        return max(values) if agg == "max" else sum(values)

    return Load(total(_RUNNING), total(_WAITING), total(_KV_USAGE, "max"))


# -- one upstream's state ----------------------------------------------------------------------


@dataclass
class UpstreamState:
    """What routing knows of one upstream; changed only on the upstream set's loop thread."""

    spec: UpstreamSpec
    inflight: int = 0  # requests this gateway has open on it
    load: Load | None = None  # the last /metrics reading; None: it has none
    sent_since_poll: int = 0  # requests sent after that reading (it cannot show them yet)
    dispatched: int = 0  # requests sent since start (ties go to the least used)
    failures: int = 0  # in a row
    cooldown_until: float = 0.0  # monotonic seconds
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def healthy(self, now: float) -> bool:
        return now >= self.cooldown_until

    def score(self) -> float:
        """Lower is less loaded. Waiting requests weigh most: they are what a new one joins."""
        if self.load is None:
            return float(self.inflight)
        queued = self.load.running + self.sent_since_poll
        return 2.0 * self.load.waiting + queued + self.load.kv_usage

    # -- events --------------------------------------------------------------------------------

    def sent(self) -> None:
        self.inflight += 1
        self.dispatched += 1
        self.sent_since_poll += 1

    def ended(self) -> None:
        self.inflight = max(0, self.inflight - 1)

    def polled(self, load: Load | None) -> None:
        """A successful poll: a fresh reading (None: it serves no metrics), and healthy again."""
        self.load = load
        self.sent_since_poll = 0
        self.succeeded()

    def succeeded(self) -> None:
        self.failures = 0
        self.cooldown_until = 0.0
        self.last_error = None

    def failed(self, now: float, why: str) -> float:
        """Cool down: 5 s, then twice as long on each failure in a row, up to a minute."""
        self.failures += 1
        wait = min(COOLDOWN_BASE_S * 2 ** (self.failures - 1), COOLDOWN_CAP_S)
        self.cooldown_until = max(self.cooldown_until, now + wait)
        self.last_error = why
        return wait

    def describe(self, now: float) -> dict[str, object]:
        """Its entry in /ready."""
        out: dict[str, object] = {
            "model": self.spec.model,
            "url": self.spec.url,
            "state": "healthy" if self.healthy(now) else "cooling down",
            "in_flight": self.inflight,
        }
        if self.load is not None:
            out["waiting"] = self.load.waiting
            out["running"] = self.load.running
        if not self.healthy(now):
            out["retry_in_s"] = round(self.cooldown_until - now, 1)
        if self.last_error:
            out["last_error"] = self.last_error
        return out


def choose(
    states: Iterable[UpstreamState], now: float, exclude: Iterable[str] = ()
) -> UpstreamState | None:
    """The least-loaded healthy upstream not in `exclude`; if every one is cooling down, the
    one that recovers first (better a try than a refusal); None when all are excluded."""
    skip = set(exclude)
    candidates = [s for s in states if s.name not in skip]
    if not candidates:
        return None
    healthy = [s for s in candidates if s.healthy(now)]
    if not healthy:
        return min(candidates, key=lambda s: s.cooldown_until)
    return min(healthy, key=lambda s: (s.score(), s.dispatched))
