"""Models served by other OpenAI-compatible servers (vLLM, llama-server, another Freehold, a
hosted API), behind this server's gateway: the same keys, quotas, ledger, audit and metrics.

An `UpstreamSet` owns one background asyncio loop (a thread) with one `httpx.AsyncClient`:
it polls each upstream's `/metrics` about once a second for routing and health, and streams
every request. An `UpstreamEngine` per served model id gives the front doors the engine
interface they already use: `chat()` / `submit()` pick the least-loaded healthy upstream of
the model's group, send a streaming `/v1/chat/completions` (or `/v1/completions`) with
`stream_options.include_usage`, and turn its SSE chunks into `Delta`s and one `Finished`
whose usage is the upstream's own count (what gets billed).

`chat()` returns once the upstream has answered with its status line: a refusal (400, 413,
422) reaches the client as such, and a request that cannot connect, or that an upstream
refuses with 429/5xx before any token, is tried on the next upstream of the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from freehold.cluster.routing import Load, UpstreamSpec, UpstreamState, choose, groups, parse_load
from freehold.engine import (
    Delta,
    EngineStats,
    Finished,
    RequestHandle,
    SamplingParams,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from freehold.engine.types import FinishReason, Outbox
from freehold.server.errors import APIError

if TYPE_CHECKING:
    from freehold.server.metrics import Metrics
    from freehold.server.registry import ModelRegistry

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 5.0
OPEN_TIMEOUT_S = 300.0  # until the upstream's status line: it may queue before answering
READ_TIMEOUT_S = 300.0  # between two chunks of a stream
UNKNOWN_CTX = 131072  # the upstream enforces its own context; doors only need an upper bound
_RETRY_STATUSES = {429, 500, 502, 503, 504}
_PASS_STATUSES = {400, 413, 422}  # the request's own fault: the client should see it
_PLACEHOLDER_TOKEN = -1  # upstreams send text, not this model's token ids


class UpstreamHandle(RequestHandle):
    """A request on an upstream: cancelling it closes the upstream stream."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self._outbox_own = Outbox()
        super().__init__(request_id, threading.Event(), self._outbox_own)
        self._upstream_loop = loop
        self.task: asyncio.Task[None] | None = None

    def push(self, ev: Delta | Finished) -> None:
        """Called on the upstream loop only; each event goes out at once (no engine steps)."""
        self._push(ev)
        self._outbox_own.flush()

    def cancel(self) -> None:
        super().cancel()
        task = self.task
        if task is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to stop
                self._upstream_loop.call_soon_threadsafe(task.cancel)


# -- request bodies ----------------------------------------------------------------------------


def sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as OpenAI request fields. llama.cpp-only knobs (top_k, min_p,
    repeat_penalty) are not sent: hosted APIs refuse unknown fields. A GBNF grammar cannot
    be sent anywhere portable, so it is refused."""
    if params.grammar is not None:
        raise APIError(
            400,
            "a GBNF grammar cannot be sent to an upstream model; use response_format "
            "(json_object or json_schema) instead",
            param="grammar",
        )
    body: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    if params.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": params.json_schema},
        }
    elif params.json_mode:
        body["response_format"] = {"type": "json_object"}
    return body


def _wire_message(m: dict[str, Any]) -> dict[str, Any]:
    """A template message as OpenAI's wire expects it (tool call arguments as JSON text)."""
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = []
    for c in calls:
        fn = dict(c.get("function", {}))
        if not isinstance(fn.get("arguments"), str):
            fn["arguments"] = json.dumps(fn.get("arguments", {}))
        out.append({"type": "function", **c, "function": fn})
    return {**m, "tool_calls": out}


def chat_body(
    model: str,
    messages: list[dict[str, Any]],
    params: SamplingParams,
    tools: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [_wire_message(m) for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling_fields(params),
    }
    if tools:
        body["tools"] = tools
        if params.json_schema is not None:  # the doors' way to force a call: say it upstream
            body.pop("response_format", None)
            body["tool_choice"] = forced_choice(params.json_schema)
    if params.logprobs:
        body["logprobs"] = True
        if params.top_logprobs:
            body["top_logprobs"] = params.top_logprobs
    return body


def forced_choice(call_schema: dict[str, Any]) -> str | dict[str, Any]:
    """OpenAI's tool_choice for the schema a door constrains a forced call to: one function
    (its name is the schema's `const`) or any of them ("required")."""
    name = call_schema.get("properties", {}).get("name", {}).get("const")
    if isinstance(name, str):
        return {"type": "function", "function": {"name": name}}
    return "required"


def completion_body(model: str, prompt: str, params: SamplingParams) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling_fields(params),
    }
    body.pop("response_format", None)  # /v1/completions has none
    return body


# -- reading a stream --------------------------------------------------------------------------


class StreamReader:
    """An upstream's SSE chunks (chat or completions) as engine events."""

    def __init__(self, submitted_at: float) -> None:
        self.submitted_at = submitted_at
        self.first_at: float | None = None
        self.chunks = 0  # content chunks: the completion's size if no usage comes
        self.finish_reason: FinishReason = "stop"
        self.usage: Usage | None = None
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.error: str | None = None

    def feed(self, chunk: dict[str, Any]) -> Iterator[Delta]:
        if "error" in chunk:
            err = chunk["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason") == "length":
                self.finish_reason = "length"
            delta = choice.get("delta")
            text = (delta or {}).get("content") if delta is not None else choice.get("text")
            for call in (delta or {}).get("tool_calls") or []:
                self._add_call(call)
            lps = _logprobs(choice.get("logprobs"))
            if text or lps:
                yield self.delta(text or "", lps)

    def delta(self, text: str, lps: tuple[TokenLogprob, ...]) -> Delta:
        self.chunks += 1
        if self.first_at is None:
            self.first_at = time.perf_counter()
        return Delta(text, (_PLACEHOLDER_TOKEN,) * max(1, len(lps)), lps)

    def _add_call(self, call: dict[str, Any]) -> None:
        slot = self.tool_calls.setdefault(int(call.get("index", 0)), {"name": "", "arguments": ""})
        fn = call.get("function") or {}
        slot["name"] += fn.get("name") or ""
        slot["arguments"] += fn.get("arguments") or ""

    def calls_text(self) -> str:
        """Tool calls as the text Freehold's reply splitter reads (`<tool_call>{json}`), so
        every door renders an upstream's calls as it renders a local model's."""
        out = []
        for _, c in sorted(self.tool_calls.items()):
            try:
                args: Any = json.loads(c["arguments"] or "{}")
            except json.JSONDecodeError:
                args = c["arguments"]
            out.append(
                f"<tool_call>{json.dumps({'name': c['name'], 'arguments': args})}</tool_call>"
            )
        return "".join(out)

    def finished(self, reason: FinishReason | None = None, error: str | None = None) -> Finished:
        now = time.perf_counter()
        usage = self.usage or Usage(0, self.chunks, 0)
        total = now - self.submitted_at
        ttft = (self.first_at or now) - self.submitted_at
        decode = max(total - ttft, 1e-9)
        timings = Timings(
            queued_s=0.0,
            ttft_s=ttft,
            total_s=total,
            prefill_tokens_per_s=usage.prompt_tokens / ttft if ttft > 0 else 0.0,
            decode_tokens_per_s=max(usage.completion_tokens - 1, 0) / decode,
        )
        error = error or self.error
        if error is not None:
            return Finished("error", usage, timings, error=error)
        return Finished(reason or self.finish_reason, usage, timings)


def _usage(u: dict[str, Any]) -> Usage:
    details = u.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


def _logprobs(lp: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
        return ()
    return tuple(
        TokenLogprob(
            _PLACEHOLDER_TOKEN,
            t.get("token", ""),
            float(t.get("logprob", 0.0)),
            tuple(
                TopLogprob(_PLACEHOLDER_TOKEN, x.get("token", ""), float(x.get("logprob", 0.0)))
                for x in t.get("top_logprobs") or []
            ),
        )
        for t in lp["content"]
    )


def _upstream_message(resp: httpx.Response, body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = None
    return str(msg or body[:300].decode(errors="replace") or resp.reason_phrase)


# -- the set -----------------------------------------------------------------------------------


class UpstreamSet:
    """Every `--upstream` of a server: one loop thread, one HTTP client, routing and health."""

    def __init__(self, specs: Iterable[UpstreamSpec], *, poll_interval_s: float = POLL_INTERVAL_S):
        self.states = [UpstreamState(s) for s in specs]
        self.poll_interval_s = poll_interval_s
        self.groups = {
            model: [st for st in self.states if st.spec.model == model]
            for model in groups(s.spec for s in self.states)
        }
        self.engines = {model: UpstreamEngine(model, self) for model in self.groups}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="freehold-upstreams", daemon=True
        )
        self._client: httpx.AsyncClient | None = None
        self._poller: Future[None] | None = None
        self._next_id = 0
        self._id_lock = threading.Lock()

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread.is_alive():
            return
        self._thread.start()
        self._poller = asyncio.run_coroutine_threadsafe(self._poll_forever(), self._loop)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made on the loop, which it belongs to
            timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        return self._client

    def _headers(self, spec: UpstreamSpec) -> dict[str, str]:
        return {"Authorization": f"Bearer {spec.key}"} if spec.key else {}

    # -- health and load -----------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            try:
                await asyncio.gather(*(self._poll(st) for st in self.states))
            except Exception:  # a bug here must not stop health checks for good
                log.exception("polling the upstreams failed")
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, st: UpstreamState) -> None:
        """Read /metrics: an answer (even 404: no metrics) means the upstream is up."""
        now = time.monotonic()
        if not st.healthy(now) and st.cooldown_until - now > self.poll_interval_s:
            return  # it is sitting out its cooldown; look again when it ends
        try:
            r = await self._http().get(
                st.spec.root + "/metrics",
                headers=self._headers(st.spec),
                timeout=min(CONNECT_TIMEOUT_S, 2 * self.poll_interval_s + 1),
            )
        except httpx.HTTPError as e:
            self._failed(st, f"health check: {type(e).__name__}: {e}")
            return
        if r.status_code >= 500:
            self._failed(st, f"health check: /metrics answered {r.status_code}")
            return
        load: Load | None = None
        if r.status_code == 200:
            with contextlib.suppress(ValueError):
                load = parse_load(r.text, st.spec.model)
        st.polled(load)

    def _failed(self, st: UpstreamState, why: str) -> None:
        was_healthy = st.healthy(time.monotonic())
        wait = st.failed(time.monotonic(), why)
        if was_healthy:
            log.warning("upstream %s cooling down for %.0fs: %s", st.name, wait, why)

    def healthy(self, model: str) -> bool:
        now = time.monotonic()
        return any(st.healthy(now) for st in self.groups[model])

    def describe(self) -> dict[str, dict[str, object]]:
        """Each upstream's state, for /ready."""
        now = time.monotonic()
        return {st.name: st.describe(now) for st in self.states}

    def collector(self) -> Collector:
        return _UpstreamCollector(self)

    # -- requests ------------------------------------------------------------------------------

    def new_handle(self) -> UpstreamHandle:
        with self._id_lock:
            self._next_id += 1
            return UpstreamHandle(self._next_id, self._loop)

    def start_request(self, model: str, path: str, body: dict[str, Any]) -> UpstreamHandle:
        """Open the stream on an upstream of `model`'s group (blocking until it answers)."""
        if not self._thread.is_alive():
            raise APIError(503, "the server's upstreams are not running", code="upstream_closed")
        handle = self.new_handle()
        opened = asyncio.run_coroutine_threadsafe(self._open(model, path, body, handle), self._loop)
        try:
            opened.result(timeout=OPEN_TIMEOUT_S + CONNECT_TIMEOUT_S)
        except TimeoutError:
            opened.cancel()
            raise APIError(
                504, f"no upstream of {model} answered within {OPEN_TIMEOUT_S:.0f}s"
            ) from None
        return handle

    async def _open(
        self, model: str, path: str, body: dict[str, Any], handle: UpstreamHandle
    ) -> None:
        tried: list[str] = []
        last: APIError | None = None
        while (st := choose(self.groups[model], time.monotonic(), tried)) is not None:
            tried.append(st.name)
            st.sent()
            try:
                resp = await self._send(st, path, body)
            except _Retry as e:  # could not reach it, or it refused for now: try another
                st.ended()
                last = e.error
                continue
            except BaseException:
                st.ended()
                raise
            handle.task = asyncio.create_task(self._pump(st, resp, handle))
            return
        assert last is not None
        raise last

    async def _send(self, st: UpstreamState, path: str, body: dict[str, Any]) -> httpx.Response:
        """The open response (status 200), or the APIError to retry elsewhere or give up."""
        spec = st.spec
        request = self._http().build_request(
            "POST",
            spec.url + path,
            json={**body, "model": spec.model},
            headers=self._headers(spec),
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=OPEN_TIMEOUT_S),
        )
        try:
            resp = await self._http().send(request, stream=True)
        except httpx.HTTPError as e:
            self._failed(st, f"{type(e).__name__}: {e}")
            raise _Retry(
                APIError(
                    502,
                    f"upstream {spec.name} ({spec.url}) could not be reached: {type(e).__name__}",
                    code="upstream_unreachable",
                )
            ) from None
        if resp.status_code == 200:
            return resp
        text = await resp.aread()
        await resp.aclose()
        message = f"upstream {spec.name}: {_upstream_message(resp, text)}"
        status = resp.status_code
        if status >= 500:
            self._failed(st, f"answered {status}")
        if status in _PASS_STATUSES:
            raise APIError(status, message, code="upstream_refused")
        if status == 429:
            raise _Retry(APIError(429, message, code="upstream_busy", headers={"Retry-After": "1"}))
        error = APIError(502, f"{message} (status {status})", code="upstream_error")
        # 401/403/404 are this gateway's configuration (key, model name): every try would fail.
        raise _Retry(error) if status in _RETRY_STATUSES else error

    async def _pump(self, st: UpstreamState, resp: httpx.Response, handle: UpstreamHandle) -> None:
        reader = StreamReader(handle.submitted_at)
        end: Finished | None = None
        try:
            async for line in resp.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else None
                if not data:
                    continue
                if data == "[DONE]":
                    break
                for delta in reader.feed(json.loads(data)):
                    handle.push(delta)
            if reader.tool_calls:
                handle.push(reader.delta(reader.calls_text(), ()))
            end = reader.finished()
            st.succeeded()
        except asyncio.CancelledError:
            end = reader.finished("cancelled")
        except (httpx.HTTPError, ValueError) as e:
            self._failed(st, f"stream broke: {type(e).__name__}: {e}")
            end = reader.finished(error=f"upstream {st.name} stream broke: {type(e).__name__}")
        finally:
            st.ended()
            handle.push(end or reader.finished("cancelled"))
            with contextlib.suppress(Exception):
                await asyncio.shield(resp.aclose())


class _Retry(Exception):
    """A failure before any token that another upstream of the group may not have."""

    def __init__(self, error: APIError) -> None:
        super().__init__(str(error))
        self.error = error


# -- what the doors see ------------------------------------------------------------------------


def _no_tokenizer(model: str, what: str) -> APIError:
    return APIError(
        501,
        f"{what} needs the model's tokenizer, and {model} is served by an upstream server, "
        "whose tokenizer this server does not have; use a model served here, or ask the "
        "upstream directly",
        code="not_supported_for_upstream",
    )


class UpstreamEngine:
    """One served model id backed by a group of upstreams, with the engine interface the
    front doors use. Token-level features (tokenize, token-id prompts, embeddings, Ollama's
    context arrays) need the model's tokenizer, which an upstream does not share: 501."""

    chat_template = None  # the upstream renders its own
    chat_template_origin = None

    def __init__(self, model: str, upstreams: UpstreamSet) -> None:
        self.name = model
        self.upstreams = upstreams
        self.states = upstreams.groups[model]
        self.n_slots = sum(st.spec.slots for st in self.states)
        self.n_ctx_per_slot = UNKNOWN_CTX

    @property
    def model(self) -> Any:
        raise _no_tokenizer(self.name, "this request")

    def available(self) -> bool:
        """False while every upstream of the group cools down (the registry's /ready state)."""
        return self.upstreams.healthy(self.name)

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> RequestHandle:
        body = chat_body(self.name, messages, params or SamplingParams(), tools)
        return self.upstreams.start_request(self.name, "/chat/completions", body)

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        add_special: bool = True,
    ) -> RequestHandle:
        if not isinstance(prompt, str):
            raise _no_tokenizer(self.name, "a prompt of token ids")
        body = completion_body(self.name, prompt, params or SamplingParams())
        return self.upstreams.start_request(self.name, "/completions", body)

    def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        timeout: float | None = None,
        add_special: bool = True,
    ) -> Any:
        return self.submit(prompt, params, add_special=add_special).result(timeout)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        raise _no_tokenizer(self.name, "counting or handling tokens")

    def detokenize(self, tokens: list[int]) -> str:
        raise _no_tokenizer(self.name, "a prompt of token ids")

    def chat_tokens(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        raise _no_tokenizer(self.name, "counting tokens")

    def render_chat(self, messages: list[dict[str, Any]], **kw: Any) -> str:
        raise _no_tokenizer(self.name, "rendering the chat template")

    def embed(self, texts: list[str], *, normalize: bool = True) -> list[list[float]]:
        raise _no_tokenizer(self.name, "embeddings")

    def stats(self) -> EngineStats:
        """The gateway's view: requests it has open on the group (Freehold's own gauges)."""
        running = sum(st.inflight for st in self.states)
        waiting = sum(int(st.load.waiting) for st in self.states if st.load is not None)
        return EngineStats(
            model=self.name,
            slots=self.n_slots,
            running=running,
            queued=waiting,
            max_queue=0,
            n_ctx_per_slot=self.n_ctx_per_slot,
            tokens_generated=0,
            prompt_tokens_computed=0,
            prompt_tokens_cached=0,
        )

    @property
    def busy(self) -> bool:
        return any(st.inflight for st in self.states)

    def resident_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """The upstream set owns the connections; it closes them."""


class _UpstreamCollector(Collector):
    def __init__(self, upstreams: UpstreamSet) -> None:
        self.upstreams = upstreams

    def collect(self) -> Iterable[Metric]:
        labels = ["upstream", "model"]
        healthy = GaugeMetricFamily(
            "freehold_upstream_healthy",
            "1 if the upstream takes requests, 0 while it cools down",
            labels=labels,
        )
        inflight = GaugeMetricFamily(
            "freehold_upstream_in_flight",
            "Requests this server has open on the upstream",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "freehold_upstream_waiting",
            "Requests waiting on the upstream, from its /metrics",
            labels=labels,
        )
        running = GaugeMetricFamily(
            "freehold_upstream_running",
            "Requests running on the upstream, from its /metrics",
            labels=labels,
        )
        now = time.monotonic()
        for st in self.upstreams.states:
            lv = [st.name, st.spec.model]
            healthy.add_metric(lv, 1.0 if st.healthy(now) else 0.0)
            inflight.add_metric(lv, st.inflight)
            if st.load is not None:
                waiting.add_metric(lv, st.load.waiting)
                running.add_metric(lv, st.load.running)
        yield from (healthy, inflight, waiting, running)


def attach_upstreams(
    specs: list[UpstreamSpec], registry: ModelRegistry, metrics: Metrics
) -> UpstreamSet | None:
    """Serve each upstream group's model id from the registry, with its gauges in /metrics;
    None when there are no upstreams. The caller starts and closes the set."""
    if not specs:
        return None
    upstreams = UpstreamSet(specs)
    for model, engine in upstreams.engines.items():
        registry.add_external(model, engine)  # type: ignore[arg-type]
    metrics.registry.register(upstreams.collector())
    return upstreams
