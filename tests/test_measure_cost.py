"""The cost formula against hand-worked examples; profiles, price sheets, the `cost` command."""

from __future__ import annotations

import base64
import json
import os
import stat
from html.parser import HTMLParser
from pathlib import Path

import pytest

from freehold.config import paths
from freehold.errors import InvalidInput, NotFound
from freehold.measure import cost_formulas, cost_report, hardware, measurements, prices, report
from freehold.measure.cost_formulas import CostInputs

PNG = b"\x89PNG\r\n\x1a\n"

# Owned: $2000 over 20,000 h = $0.10/h. Average draw at 50%: (0.5 x 200 + 0.5 x 50) W = 125 W;
# x PUE 1.2 x $0.20/kWh = $0.03/h. Ops $0.07/h. Total $0.20/h.
OWNED = CostInputs(
    utilisation=0.5,
    purchase_usd=2000,
    lifetime_hours=20_000,
    watts_load=200,
    watts_idle=50,
    usd_per_kwh=0.20,
    pue=1.2,
    ops_usd_per_hour=0.07,
)


def test_owned_hardware_hand_worked() -> None:
    h = cost_formulas.hourly(OWNED)
    assert h.hardware == pytest.approx(0.10)
    assert h.energy == pytest.approx(0.03)
    assert h.total == pytest.approx(0.20)
    local = cost_formulas.local_cost(OWNED, prefill_tps=1000, decode_tps=100)
    # 1e6 x 0.20 / (100 x 3600 x 0.5) = 200,000 / 180,000
    assert local.output_per_mtok == pytest.approx(10 / 9)
    assert local.input_per_mtok == pytest.approx(1 / 9)
    assert local.blended_per_mtok == pytest.approx((3 / 9 + 10 / 9) / 4)


def test_rented_hardware_hand_worked() -> None:
    # $1.50/h rent + $0.30/h ops; power is in the rent, so the watts do not count.
    rented = CostInputs(
        utilisation=0.9,
        rent_usd_per_hour=1.50,
        watts_load=700,
        watts_idle=100,
        usd_per_kwh=0.30,
        pue=1.5,
        ops_usd_per_hour=0.30,
    )
    assert cost_formulas.hourly(rented).total == pytest.approx(1.80)
    # 1e6 x 1.80 / (500 x 3600 x 0.9) = 1.8e6 / 1.62e6
    assert cost_formulas.local_cost(rented, 2000, 500).output_per_mtok == pytest.approx(1.8 / 1.62)
    assert cost_formulas.fixed_per_month(rented) == pytest.approx(1.80 * 730)


def test_utilisation_and_pue() -> None:
    flat = CostInputs(utilisation=1.0, purchase_usd=8760, lifetime_hours=8760)  # $1/h
    assert cost_formulas.local_cost(flat, 1000, 1000).output_per_mtok == pytest.approx(1e6 / 3.6e6)
    quarter = CostInputs(utilisation=0.25, purchase_usd=8760, lifetime_hours=8760)
    # A quarter as busy: every useful token carries four times the idle hours.
    assert cost_formulas.local_cost(quarter, 1000, 1000).output_per_mtok == pytest.approx(
        4e6 / 3.6e6
    )
    # 1 kW at full load, $0.10/kWh: $0.10/h at PUE 1, $0.15/h at PUE 1.5.
    for pue, expected in ((1.0, 0.10), (1.5, 0.15)):
        c = CostInputs(
            utilisation=1.0,
            purchase_usd=0,
            lifetime_hours=1,
            watts_load=1000,
            usd_per_kwh=0.10,
            pue=pue,
        )
        assert cost_formulas.energy_per_hour(c) == pytest.approx(expected)
    assert cost_formulas.usd_per_mtok(3.6, 1000, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cost_formulas.usd_per_mtok(1.0, 0, 0.5)


def test_savings_and_break_even_hand_worked() -> None:
    assert cost_formulas.savings_pct(1.0, 4.0) == pytest.approx(75.0)
    assert cost_formulas.savings_pct(5.0, 4.0) == pytest.approx(-25.0)
    assert cost_formulas.blend(2.0, 10.0) == pytest.approx(4.0)
    # Fixed a month: ($0.10 hardware + $0.07 ops + 50 W idle x 1.2 x $0.20) x 730 h = $132.86.
    assert cost_formulas.fixed_per_month(OWNED) == pytest.approx(0.182 * 730)
    # 1M blended tokens take (3/1000 + 1/100) / 4 s per token = 0.9028 busy hours, drawing
    # 150 W over idle x 1.2 x $0.20 = $0.036/h: $0.0325 of energy per 1M tokens.
    assert cost_formulas.marginal_per_mtok(OWNED, 1000, 100) == pytest.approx(0.0325)
    be = cost_formulas.break_even_mtok_per_month(OWNED, 1000, 100, api_blended=4.0)
    assert be == pytest.approx(0.182 * 730 / (4.0 - 0.0325))
    assert cost_formulas.capacity_mtok_per_month(1000, 100) == pytest.approx(730 / (3250 / 3600))
    # An API cheaper than the electricity never breaks even.
    assert cost_formulas.break_even_mtok_per_month(OWNED, 1000, 100, api_blended=0.01) is None
    local = cost_formulas.local_cost(OWNED, 1000, 100)
    c = cost_formulas.compare(OWNED, local, 1000, 100, api_input=2.0, api_output=10.0)
    assert c.api_blended_per_mtok == pytest.approx(4.0)
    assert c.input_savings_pct == pytest.approx(100 * (1 - (1 / 9) / 2.0))
    assert c.output_savings_pct == pytest.approx(100 * (1 - (10 / 9) / 10.0))
    assert c.break_even_within_capacity


def test_bundled_price_sheet_is_dated_and_sourced() -> None:
    sheet = prices.load_prices()
    frontier = [p for p in sheet if p.open_weights is False]
    hosted_open = [p for p in sheet if p.open_weights is True]
    assert len(frontier) >= 4 and len(hosted_open) >= 4
    assert all(p.as_of and p.source.startswith("http") for p in sheet)
    assert len({p.provider for p in frontier}) >= 3


def test_user_csv_and_litellm_json(tmp_path: Path) -> None:
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text(
        ",".join(prices.CSV_COLUMNS) + "\n"
        'Acme,"Big, Model",no,1.5,6,2026-01-02,https://example.invalid/p\n'
    )
    (row,) = prices.load_prices(csv_file)
    assert (row.model, row.input_per_mtok, row.as_of) == ("Big, Model", 1.5, "2026-01-02")
    litellm = tmp_path / "model_prices_and_context_window.json"
    litellm.write_text(
        json.dumps(
            {
                "sample_spec": {"input_cost_per_token": 0.0},
                "gpt-x": {
                    "input_cost_per_token": 2.5e-06,
                    "output_cost_per_token": 1e-05,
                    "litellm_provider": "openai",
                    "mode": "chat",
                },
                "embed-y": {"input_cost_per_token": 1e-07, "litellm_provider": "openai"},
            }
        )
    )
    (row,) = prices.load_prices(litellm)
    assert row.name == "openai gpt-x"
    assert row.input_per_mtok == pytest.approx(2.5) and row.output_per_mtok == pytest.approx(10)
    assert "file date" in row.as_of
    bad = tmp_path / "bad.csv"
    bad.write_text("provider,model\nA,B\n")
    with pytest.raises(InvalidInput, match="lacks columns"):
        prices.load_prices(bad)
    with pytest.raises(NotFound):
        prices.load_prices(tmp_path / "missing.csv")
    assert [p.model for p in prices.filter_prices(prices.load_prices(), ["claude haiku"])] == [
        "Claude Haiku 4.5"
    ]


def test_profile_set_is_saved_atomically_and_keeps_other_settings(home: Path) -> None:
    h = paths(home)
    h.root.mkdir(parents=True)
    h.settings.write_text(json.dumps({"server": {"port": 8080}}))
    profile = hardware.set_profile(["price_usd=1,800", "utilisation=40%", "pue=1.1"], h)
    assert profile.values["price_usd"] == 1800 and profile.origin["price_usd"] == "set"
    assert profile.values["utilisation"] == pytest.approx(0.4)
    assert profile.origin["watts_load"] == "default (assumed)"
    saved = json.loads(h.settings.read_text())
    assert saved["server"] == {"port": 8080}
    assert saved["hardware"]["pue"] == 1.1
    assert [f.name for f in h.root.iterdir()] == ["settings.json"]  # no temp file left
    assert not hardware.load_profile(h).rented
    rented = hardware.set_profile(["rent_usd_per_hour=2.5 ops_usd_per_hour=0.5"], h)
    assert rented.rented and rented.cost_inputs().rent_usd_per_hour == 2.5
    assert rented.values["ops_usd_per_hour"] == 0.5
    assert not hardware.set_profile(["rent_usd_per_hour="], h).rented  # `key=` forgets
    h.settings.write_text(json.dumps({"hardware": {"pue": "cold"}}))
    with pytest.raises(InvalidInput, match="hardware.pue"):
        hardware.load_profile(h)
    for bad, match in (
        ("utilisation=0", "utilisation"),
        ("pue=0.5", "PUE"),
        ("watts=3", "unknown"),
        ("price_usd=lots", "not a number"),
        ("price_usd", "key=value"),
    ):
        with pytest.raises(InvalidInput, match=match):
            hardware.set_profile([bad], h)


def test_hardware_detection_tolerates_missing_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    m = hardware.detect()
    assert m.cores >= 1 and m.ram_gib > 0 and m.cpu and m.gpus == []
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert hardware.detect().gpus == ["NVIDIA H100 80GB HBM3, 81559 MiB"]
    fake.write_text("#!/bin/sh\nexit 9\n")  # a broken driver reads as no GPU
    assert hardware.detect().gpus == []


def test_report_labels_measured_and_assumed(home: Path) -> None:
    h = paths(home)
    measurements.record_throughput(
        "m", decode_tps=50.0, prefill_tps=400.0, source="test bench", home=h
    )
    rep = cost_report.build_report(decode_tps=25.0, home=h)
    origins = {i.name: i.origin for i in rep.inputs}
    assert origins["decode"] == "assumed (--decode-tps)"
    assert origins["prefill"].startswith("measured by test bench")
    assert origins["utilisation"] == "default (assumed)" and origins["cores"] == "detected"
    assert rep.decode_tps == 25.0 and rep.prefill_tps == 400.0
    expected = cost_formulas.local_cost(hardware.load_profile(h).cost_inputs(), 400.0, 25.0)
    assert rep.local.output_per_mtok == pytest.approx(expected.output_per_mtok)
    hardware.set_profile(["rent_usd_per_hour=0.9"], h)
    rented = {i.name: i.origin for i in cost_report.build_report(home=h).inputs}
    assert "price_usd" not in rented and rented["watts_load"].startswith("not used")


def test_cost_without_throughput_says_what_to_do(home: Path) -> None:
    with pytest.raises(InvalidInput, match="freehold bench --url"):
        cost_report.build_report(home=paths(home))


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def test_cost_cli_prints_comparisons_and_writes_report(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    from freehold.cli import console

    monkeypatch.setattr(console, "_width", 200)  # a wide terminal: one line per comparator
    result = cli("cost", "--set", "price_usd=1200", "--set", "utilisation=25%")
    assert result.code == 0, result.err
    assert "price_usd" in result.out
    source = "bench --url http://127.0.0.1:8080"
    measurements.record_throughput("smollm2", 133.0, 350.0, source, home=paths(home))
    html_file = tmp_path / "out" / "cost.html"
    result = cli("cost", "--report", html_file)
    assert result.code == 0, result.err
    out = result.out
    assert "per 1M input tokens" in out and "per 1M output tokens" in out
    assert "at 25% utilisation" in out
    sheet = prices.load_prices()
    shown = [p for p in sheet if p.model in out]
    assert sum(p.open_weights is False for p in shown) >= 4
    assert sum(p.open_weights is True for p in shown) >= 4
    assert "measured by bench --url" in out and "default (assumed)" in out
    # The HTML report: every image is a real, decodable PNG.
    parser = _Images()
    parser.feed(html_file.read_text(encoding="utf-8"))
    prefix = "data:image/png;base64,"
    assert len(parser.srcs) == 2
    for src in parser.srcs:
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG)
    assert not [f for f in os.listdir(html_file.parent) if f.endswith(".tmp")]
    # JSON: every comparator row names its comparator, date and the utilisation assumed.
    data = cli("cost", "--json", "--only", "claude").json()
    assert data["rows"] and all(r["price"]["as_of"] for r in data["rows"])
    assert all(r["utilisation"] == 0.25 and "Claude" in r["comparator"] for r in data["rows"])
    assert data["local"]["utilisation"] == 0.25


def test_write_html_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.html"
    target.write_text("old")

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        report.write_html(target, "<html>new</html>")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.html"]
