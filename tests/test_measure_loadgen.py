"""The load generator against a tiny streaming server whose timings are known exactly.

The server (raw asyncio on 127.0.0.1, a free port) waits TTFT after reading a request, then
emits one SSE chunk every ITL seconds, scheduled on absolute deadlines so jitter does not
accumulate, then a usage chunk and [DONE]. So every request has
TTFT = 1000 ms, ITL = TPOT = 80 ms, E2E = TTFT + (n - 1) x ITL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from freehold.config import paths
from freehold.errors import InvalidInput
from freehold.measure import bench_server, loadgen, measurements
from freehold.measure.loadgen import Target

# TTFT includes waking the client for the first chunk: 10-30 ms on a small VM, so the fake TTFT is
# long enough for the 5% tolerance to test the client's arithmetic, not the VM's scheduler.
TTFT, ITL = 1.000, 0.080
SLOW_TTFT = 1.500
PNG = b"\x89PNG\r\n\x1a\n"


class FakeServer:
    """OpenAI-style streaming completions with known timings; records what it was sent and the
    text it replied (every reply unique: `r<request number>tok<k>`).

    It runs in a forked process so that its timing never waits on the client's GIL. `cache`
    says how it reports an ideal prefix cache (every message but the last is cached): "openai"
    in usage.prompt_tokens_details, "llama" as llama-server does (usage without prompt tokens,
    `timings.cache_n` / `prompt_n` on the last choice chunk), None not at all.
    """

    def __init__(
        self, log: Path, usage: bool = True, cache: str | None = None, ttft: float = TTFT
    ) -> None:
        self.usage = usage
        self.cache = cache
        self.ttft = ttft
        self.served = 0
        self.log = log
        ctx = multiprocessing.get_context("fork")
        self.port_value = ctx.Value("i", 0)
        self.process = ctx.Process(target=self._serve, daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port_value.value = server.sockets[0].getsockname()[1]
            await asyncio.Event().wait()

        asyncio.run(main())

    def __enter__(self) -> FakeServer:
        self.process.start()
        deadline = time.monotonic() + 10
        while self.port_value.value == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.port = self.port_value.value
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        t0 = time.perf_counter()
        lines = head.decode().split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if method == "GET" and path == "/v1/models":
            data = json.dumps({"data": [{"id": "fake-model"}]}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            return True
        req = json.loads(body)
        self.served += 1
        tag = f"r{self.served}"
        chat = path.endswith("/chat/completions")
        n = int(req["max_tokens"])
        reply = "".join(f" {tag}tok{k}" for k in range(n))
        with self.log.open("a") as f:
            f.write(json.dumps({"path": path, "headers": headers, "body": req, "reply": reply}))
            f.write("\n")
        text = req["messages"][-1]["content"] if chat else req["prompt"]
        # Tokens: words, plus a template's 5 per message or a BOS.
        sizes = [len(m["content"].split()) + 5 for m in req["messages"]] if chat else []
        prompt_tokens = sum(sizes) if chat else len(text.split()) + 1
        cached = prompt_tokens - sizes[-1] if chat else 0
        ttft = SLOW_TTFT if "SLOWREQ" in text.split() else self.ttft
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if chat:  # role-only chunk straight away: not a token, must not count as TTFT
            self._send(
                writer, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            )
            await writer.drain()
        # SSE comments while the "prompt prefills", as real servers send them: the client must
        # skip them, and they keep it from idling deep enough for a small VM to wake it late.
        while time.perf_counter() < t0 + ttft - 0.06:
            self._chunk(writer, b": keep-alive\n\n")
            await writer.drain()
            await _sleep_until(min(time.perf_counter() + 0.05, t0 + ttft - 0.06))
        for k in range(n):
            await _sleep_until(t0 + ttft + k * ITL)
            last = "stop" if "STOPREQ" in text.split() else "length"
            finish = last if k == n - 1 else None
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": f" {tag}tok{k}"}
            else:
                choice["text"] = f" {tag}tok{k}"
            chunk: dict[str, Any] = {"choices": [choice]}
            if finish and self.cache == "llama":
                chunk["timings"] = {"cache_n": cached, "prompt_n": prompt_tokens - cached}
            self._send(writer, chunk)
            await writer.drain()
        if self.usage and req.get("stream_options", {}).get("include_usage"):
            usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
            if self.cache == "openai":
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
            elif self.cache == "llama":
                del usage["prompt_tokens"]
            self._send(writer, {"choices": [], "usage": usage})
        self._chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")  # end of the chunked body; the connection stays open
        await writer.drain()
        return True

    @classmethod
    def _send(cls, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        cls._chunk(writer, b"data: " + json.dumps(obj).encode() + b"\n\n")

    @staticmethod
    def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


async def _sleep_until(deadline: float) -> None:
    # Some VMs' timers overshoot in proportion to the wait (5% seen), so approach the deadline
    # in shrinking steps rather than trusting one long sleep.
    while (left := deadline - time.perf_counter()) > 0:
        await asyncio.sleep(left * 0.8 if left > 0.005 else left)


@pytest.fixture
def server(tmp_path: Path):
    with FakeServer(tmp_path / "requests.jsonl") as s:
        yield s


def close(actual: float, expected: float, rel: float = 0.05) -> bool:
    return abs(actual - expected) <= rel * expected


def check_timings(summary: Any, n_tokens: int, ttft: float = TTFT) -> None:
    """Mean and median of every latency metric within 5% of the server's known timings."""
    e2e = ttft + (n_tokens - 1) * ITL
    for name, dist, expected in (
        ("TTFT", summary.ttft, ttft),
        ("TPOT", summary.tpot, ITL),
        ("ITL", summary.itl, ITL),
        ("E2E", summary.e2e, e2e),
    ):
        for stat in ("mean", "median"):
            got = getattr(dist, stat) / 1000.0
            assert close(got, expected), f"{name} {stat} {got:.4f}s vs {expected:.4f}s"


def test_closed_loop_sweep_matches_known_timings(server: FakeServer) -> None:
    n_tok, n_prompts = 5, 4
    target = Target(server.url, "m", api_key="sk-test")
    prompts = loadgen.synthetic_prompts(n_prompts, 10, n_tok, seed=1)
    for conc in (1, 4):
        level = loadgen.run_level(target, prompts, concurrency=conc)
        s = level.summary
        assert s.completed == n_prompts and s.failed == 0
        check_timings(s, n_tok)
        assert s.itl.count == n_prompts * (n_tok - 1)  # every gap, pooled
        # Closed loop: ceil(n / c) waves of one E2E each.
        waves = -(-n_prompts // conc)
        assert close(s.duration_s, waves * (TTFT + (n_tok - 1) * ITL), 0.10)
        assert s.request_throughput == pytest.approx(n_prompts / s.duration_s)
        assert s.output_throughput == pytest.approx(n_prompts * n_tok / s.duration_s)
        assert s.total_input_tokens == n_prompts * 11  # usage from the server: words + 1
        starts = sorted(r.start for r in level.records)
        # At concurrency c the first c requests leave together.
        assert starts[conc - 1] < 0.05
    sent = server.requests[1]  # [0] is the untimed warm-up
    assert sent["headers"]["authorization"] == "Bearer sk-test"
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert sent["body"]["max_tokens"] == n_tok


def test_poisson_open_loop_follows_its_schedule(server: FakeServer) -> None:
    n_tok, n_prompts, rate = 5, 8, 8.0
    target = Target(server.url, "m")
    prompts = loadgen.synthetic_prompts(n_prompts, 10, n_tok, seed=2)
    level = loadgen.run_level(target, prompts, rate=rate, burstiness=1.0, seed=7)
    s = level.summary
    assert s.completed == n_prompts and s.rate == rate
    check_timings(s, n_tok)
    planned = loadgen.arrival_offsets(n_prompts, rate, 1.0, seed=7)
    actual = np.array([r.start for r in level.records])
    assert np.all(np.abs(actual - planned) < 0.05), (actual, planned)
    # The run lasts until the last request is done: exactly (the client's arithmetic), and
    # about the last arrival plus one E2E (a single request, so a busy VM may stretch it).
    last_done = max(r.start + r.e2e for r in level.records)
    assert abs(s.duration_s - last_done) < 0.05, (s.duration_s, last_done)
    assert close(s.duration_s, planned[-1] + TTFT + (n_tok - 1) * ITL, 0.10)


def test_open_loop_cap_limits_requests_in_flight(server: FakeServer) -> None:
    target = Target(server.url, "m")
    prompts = loadgen.synthetic_prompts(4, 5, 3, seed=3)
    level = loadgen.run_level(target, prompts, rate=float("inf"), concurrency=2)
    starts = sorted(r.start for r in level.records)
    e2e = TTFT + 2 * ITL
    assert starts[1] < 0.03 and close(starts[2], e2e, 0.15)  # two at once, then a wait


def test_gamma_arrivals_have_the_asked_rate_and_burstiness() -> None:
    for burstiness in (0.5, 1.0, 4.0):
        offsets = loadgen.arrival_offsets(40_001, 5.0, burstiness, seed=11)
        gaps = np.diff(offsets)
        assert offsets[0] == 0.0
        assert gaps.mean() == pytest.approx(0.2, rel=0.02)
        cv2 = gaps.var() / gaps.mean() ** 2  # 1 / shape for a gamma distribution
        assert cv2 == pytest.approx(1.0 / burstiness, rel=0.05)


def test_chat_endpoint_skips_the_role_chunk(server: FakeServer) -> None:
    target = Target(server.url, "m", endpoint="chat")
    prompts = loadgen.synthetic_prompts(2, 8, 4, seed=4, chat=True)
    s = loadgen.run_level(target, prompts, concurrency=2).summary
    assert s.completed == 2
    check_timings(s, 4)
    assert server.requests[1]["path"] == "/v1/chat/completions"
    assert server.requests[1]["body"]["messages"][0]["role"] == "user"


def test_goodput_counts_requests_meeting_every_slo(server: FakeServer, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "fast one"},
        {"prompt": "a SLOWREQ one"},
        {"prompt": "fast two"},
        {"prompt": "SLOWREQ again", "output_len": 2},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = loadgen.load_dataset(data, output_len=4, num_prompts=None, chat=False)
    assert [p.output_len for p in prompts] == [4, 4, 4, 2]
    target = Target(server.url, "m")
    s = loadgen.run_level(target, prompts, concurrency=4, slo={"ttft": 1250.0}).summary
    assert s.goodput == pytest.approx(2 / s.duration_s)
    s = loadgen.run_level(target, prompts, concurrency=4, slo={"e2e": 3000.0}).summary
    assert s.goodput == pytest.approx(4 / s.duration_s)
    # The slow requests' TTFT is the slow one.
    assert close(s.ttft.p99 / 1000.0, SLOW_TTFT)


def test_calibration_sizes_prompts_with_server_token_counts(
    server: FakeServer, tmp_path: Path
) -> None:
    opts = bench_server.BenchOptions(
        Target(server.url, "m", endpoint="chat"),
        concurrency=[2],
        input_len=40,
        output_len=2,
        num_prompts=3,
    )
    home = paths(tmp_path)
    result = bench_server.run_bench(opts, record=False, home=home)
    assert result.recorded is None and not home.measurements.exists()
    s = result.summaries[0]
    assert result.words_per_prompt == 35  # 40 tokens minus the template's 5
    assert s.total_input_tokens == 3 * 40


def test_extra_body_reaches_every_request(server: FakeServer) -> None:
    extra = loadgen.parse_extra_body('{"logit_bias": {"2": -100}, "max_tokens": 3}')
    target = Target(server.url, "m", extra_body=extra)
    level = loadgen.run_level(target, loadgen.synthetic_prompts(2, 3, 5), concurrency=1)
    assert level.summary.completed == 2
    bodies = [r["body"] for r in server.requests]
    assert bodies and all(b["logit_bias"] == {"2": -100} for b in bodies)
    assert all(b["max_tokens"] == 3 for b in bodies)  # the extra body wins
    for bad in ("[1]", "{nope"):
        with pytest.raises(InvalidInput, match="--extra-body"):
            loadgen.parse_extra_body(bad)


def test_stream_without_usage(tmp_path: Path) -> None:
    """No usage chunk (llama-cpp-python's server): a stop for length still counts exactly
    max_tokens; a stop for any other reason cannot be counted; prompts cannot be sized."""
    with FakeServer(tmp_path / "requests.jsonl", usage=False) as s:
        level = loadgen.run_level(
            Target(s.url, "m"), loadgen.synthetic_prompts(2, 3, 4), concurrency=1
        )
        assert level.summary.completed == 2 and level.summary.total_output_tokens == 8
        assert level.summary.total_input_tokens == 0  # unknown
        prefill, decode, _ = loadgen.throughput_for_cost([level])
        assert prefill is None and decode > 0
        stopped = [loadgen.Prompt(4, text="STOPREQ a b")]
        level = loadgen.run_level(Target(s.url, "m"), stopped, concurrency=1)
        assert level.summary.completed == 0 and level.summary.failed == 1
        assert "include_usage" in (level.summary.first_error or "")
        opts = bench_server.BenchOptions(Target(s.url, "m"), num_prompts=1, output_len=2)
        with pytest.raises(InvalidInput, match="--no-calibrate"):
            bench_server.run_bench(opts, record=False, home=paths(tmp_path))


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    opts = bench_server.BenchOptions(
        Target("http://127.0.0.1:9", "m"), num_prompts=1, calibrate=False
    )
    with pytest.raises(InvalidInput, match="no request.*succeeded"):
        bench_server.run_bench(opts, record=False, home=paths(tmp_path))
    with pytest.raises(InvalidInput, match="not an http"):
        loadgen.check_target(Target("127.0.0.1:8080", "m"))


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def png_images(path: Path) -> list[bytes]:
    """Every <img> in an HTML file, decoded from its base64 data URI."""
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    prefix = "data:image/png;base64,"
    assert parser.srcs and all(s.startswith(prefix) for s in parser.srcs)
    return [base64.b64decode(s[len(prefix) :], validate=True) for s in parser.srcs]


def test_bench_cli_end_to_end(server: FakeServer, home: Path, tmp_path: Path, cli) -> None:
    raw, report = tmp_path / "raw.jsonl", tmp_path / "bench.html"
    args = [
        "bench",
        "--url",
        server.url,
        "--concurrency",
        "1,2",
        "--num-prompts",
        "3",
        "--input-len",
        "12",
        "--output-len",
        "5",
        "--slo",
        "ttft=1300,tpot=100",
        "--save-raw",
        str(raw),
        "--report",
        str(report),
    ]
    result = cli(*args, "--json")
    assert result.code == 0, result.err
    out = result.json()
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    assert out["meta"]["model"] == "fake-model"  # discovered from /v1/models
    for lv in out["levels"]:
        assert lv["completed"] == 3 and lv["goodput"] > 0
        assert close(lv["ttft"]["median"] / 1000, TTFT) and close(lv["tpot"]["mean"] / 1000, ITL)
    lines = [json.loads(x) for x in raw.read_text().splitlines()]
    assert len(lines) == 6 and all(x["success"] and len(x["itl_ms"]) == 4 for x in lines)
    assert not any("prompt" in x for x in lines)  # never the text
    images = png_images(report)
    assert len(images) == 3 and all(img.startswith(PNG) for img in images)
    # Throughput was recorded for `freehold cost`.
    rec = measurements.latest_throughput(paths(home), "fake-model")
    assert rec is not None and rec.decode_tps == pytest.approx(
        max(lv["output_throughput"] for lv in out["levels"])
    )
    assert rec.prefill_tps == pytest.approx(12 / TTFT, rel=0.05)  # calibrated: 12 tokens
    human = cli(*args[:-4], "--rate", "20", "--concurrency", "2")
    assert human.code == 0, human.err
    assert "rate 20/s" in human.out and "TPOT" in human.out
    cost = cli("cost")
    assert cost.code == 0, cost.err
    assert "measured by bench --url" in cost.out


def test_bench_cli_errors(home: Path, cli) -> None:
    result = cli("bench")  # neither a model nor a server
    assert result.code == 2 and result.out == ""
    assert result.err.startswith("error:") and "--url" in result.err
    result = cli("bench", "--url", "http://127.0.0.1:9", "--model", "m", "--slo", "ttft=fast")
    assert result.code == 2 and result.err.startswith("error:") and "--slo" in result.err


def test_bench_report_handles_an_unbounded_rate(tmp_path: Path) -> None:
    from freehold.measure import report
    from freehold.measure.serving_stats import RequestRecord, summarize

    recs = [RequestRecord(0, 0.0, True, 0.1, 0.5, [0.1] * 4, 10, 5)]
    levels = [
        summarize(recs, 1.0, label="rate 2/s", rate=2.0),
        summarize(recs, 0.5, label="rate inf/s", rate=float("inf")),
    ]
    path = report.write_html(tmp_path / "r.html", report.bench_html({"url": "x"}, levels))
    images = png_images(path)
    assert len(images) == 3 and all(img.startswith(PNG) for img in images)
    assert "rate inf/s" in path.read_text()


def test_dataset_parsing(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    chat = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    }
    data.write_text(json.dumps(chat) + "\n\n" + json.dumps({"prompt": "x", "max_tokens": 9}) + "\n")
    first, second = loadgen.load_dataset(data, output_len=4, num_prompts=None, chat=True)
    assert first.messages == chat["messages"] and first.output_len == 4
    assert second.messages == [{"role": "user", "content": "x"}] and second.output_len == 9
    assert len(loadgen.load_dataset(data, 4, num_prompts=1, chat=True)) == 1
    with pytest.raises(InvalidInput, match="--endpoint chat"):
        loadgen.load_dataset(data, 4, None, chat=False)
    data.write_text("not json\n")
    with pytest.raises(InvalidInput, match="line 1 is not JSON"):
        loadgen.load_dataset(data, 4, None, chat=False)
    with pytest.raises(InvalidInput, match="whole numbers"):
        loadgen.parse_int_list("1,two", "--concurrency")
    with pytest.raises(InvalidInput, match="positive"):
        bench_server.parse_rates("0")
    assert bench_server.parse_rates("1,inf") == [1.0, float("inf")]
