"""`freehold savings` against hand-worked numbers, from rows written by the ledger's own writer.

The machine: rented at $3.60/h, busy 100% of the time, so an hour buys 3600 s of work.
smollm2 measured at 1000 tok/s prefill and 100 tok/s decode:
  here input  = 1e6 x 3.60 / (1000 x 3600) = $1 per 1M;
  here output = 1e6 x 3.60 / (100 x 3600)  = $10 per 1M.
Comparators: Dear (in $2, out $10 per 1M) and Cheap (in $0.50, out $5).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from freehold.config import paths
from freehold.errors import InvalidInput
from freehold.measure import hardware, measurements, savings
from freehold.server.ledger import Ledger, UsageRecord

SHEET = (
    "provider,model,open_weights(yes/no),input_usd_per_mtok,output_usd_per_mtok,as_of,source_url\n"
    "Dear,big,no,2,10,2026-01-02,https://example.com/dear\n"
    "Cheap,small,yes,0.5,5,2026-03-04,https://example.com/cheap\n"
)

# (key, model, day, prompt, cached, completion, status)
ROWS = [
    ("alice", "smollm2", "2026-05-01", 1000, 0, 100, 200),
    ("bob", "smollm2", "2026-05-02", 3000, 500, 400, 200),
    ("bob", "unmeasured", "2026-05-02", 10, 0, 10, 200),
    ("alice", "smollm2", "2026-05-02", 0, 0, 0, 500),  # refused: counted, costs nothing
]


@pytest.fixture
def served(home: Path, tmp_path: Path) -> Path:
    h = paths(home)
    hardware.set_profile(["rent_usd_per_hour=3.6", "utilisation=100%", "ops_usd_per_hour=0"], h)
    measurements.record_throughput("smollm2", 100.0, 1000.0, "test", home=h)
    ledger = Ledger(h.ledger)
    for n, (key, model, day, prompt, cached, completion, status) in enumerate(ROWS):
        ledger.record(
            UsageRecord(
                request_id=f"r{n}",
                ts=f"{day}T12:00:00.000+00:00",
                key_name=key,
                model=model,
                endpoint="/v1/chat/completions",
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
                ttft_ms=5.0,
                duration_ms=50.0,
                status=status,
            )
        )
    assert ledger.flush()
    ledger.close()
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(SHEET)
    return sheet


def _api(g: savings.GroupSavings, name: str) -> savings.ApiCost:
    return next(a for a in g.apis if a.comparator == name)


def test_by_key_hand_worked(served: Path, home: Path) -> None:
    rep = savings.build_savings(by="key", price_file=served, home=paths(home))
    assert rep.utilisation == 1.0 and rep.hourly_usd == pytest.approx(3.6)
    (rate,) = rep.rates
    assert (rate.input_per_mtok, rate.output_per_mtok) == (pytest.approx(1.0), pytest.approx(10.0))
    bob, alice = rep.groups  # bob served more tokens
    # alice: 1000 in, 100 out. Here 0.001 + 0.001; Dear 0.002 + 0.001; Cheap 0.0005 + 0.0005.
    assert (alice.group, alice.requests, alice.failed) == ("alice", 2, 1)
    assert alice.here_usd == pytest.approx(0.002)
    assert _api(alice, "Dear big").usd == pytest.approx(0.003)
    assert _api(alice, "Dear big").savings_pct == pytest.approx(100 / 3)
    assert _api(alice, "Cheap small").usd == pytest.approx(0.001)
    assert _api(alice, "Cheap small").savings_pct == pytest.approx(-100.0)
    # bob: smollm2 3000 in (500 cached, priced as input), 400 out; the unmeasured model's
    # 10 + 10 tokens are counted but priced on neither side.
    assert (bob.prompt_tokens, bob.cached_tokens, bob.completion_tokens) == (3010, 500, 410)
    assert (bob.costed_prompt_tokens, bob.costed_completion_tokens) == (3000, 400)
    assert bob.unmeasured_models == ["unmeasured"]
    assert bob.here_usd == pytest.approx(0.003 + 0.004)
    assert _api(bob, "Dear big").usd == pytest.approx(0.006 + 0.004)
    assert _api(bob, "Dear big").savings_pct == pytest.approx(30.0)
    # total: 4000 in, 500 out. Here 0.004 + 0.005; Dear 0.008 + 0.005; Cheap 0.002 + 0.0025.
    t = rep.total
    assert (t.requests, t.failed, t.prompt_tokens, t.completion_tokens) == (4, 1, 4010, 510)
    assert t.here_usd == pytest.approx(0.009)
    assert _api(t, "Dear big").usd == pytest.approx(0.013)
    assert _api(t, "Dear big").savings_pct == pytest.approx(100 * (1 - 9 / 13))
    assert _api(t, "Cheap small").usd == pytest.approx(0.0045)
    assert _api(t, "Cheap small").savings_pct == pytest.approx(-100.0)
    assert _api(t, "Cheap small").as_of == "2026-03-04"


def test_by_day_since_and_by_model(served: Path, home: Path) -> None:
    h = paths(home)
    days = savings.build_savings(by="day", price_file=served, home=h)
    assert [g.group for g in days.groups] == ["2026-05-01", "2026-05-02"]
    late = savings.build_savings(by="day", since="2026-05-02", price_file=served, home=h)
    (day,) = late.groups
    assert (day.group, day.requests, day.prompt_tokens) == ("2026-05-02", 3, 3010)
    assert late.total.here_usd == pytest.approx(0.007)
    models = savings.build_savings(by="model", price_file=served, only=["dear"], home=h)
    assert [g.group for g in models.groups] == ["smollm2", "unmeasured"]
    nothing = models.groups[1]
    assert nothing.here_usd == 0 and [a.savings_pct for a in nothing.apis] == [None]
    assert [a.comparator for a in models.total.apis] == ["Dear big"]


def test_cli_json_and_tables(cli, served: Path) -> None:
    r = cli("savings", "--by", "key", "--prices", served, "--json")
    assert r.code == 0, r.err
    out = r.json()
    assert out["total"]["here_usd"] == pytest.approx(0.009)
    assert out["price_sheet"] == str(served)
    r = cli("savings", "--prices", served)
    assert r.code == 0, r.err
    shown = " ".join(r.out.split())
    assert "at 100% utilisation" in shown
    assert "Dear big (2026-01-02)" in shown and "Cheap small (2026-03-04)" in shown
    assert "31%" in shown and "-100%" in shown
    assert "Not costed (no measured throughput): tokens of unmeasured" in shown
    assert "Assumed cost inputs" in shown  # watts etc. were never set


def test_empty_and_bad_input(cli, home: Path) -> None:
    r = cli("savings")
    assert r.code == 0 and "No requests recorded yet" in r.out
    assert cli("savings", "--by", "week").code == 2
    r = cli("savings", "--since", "last tuesday")
    assert r.code == 2 and "--since" in r.err
    with pytest.raises(InvalidInput):
        savings.build_savings(only=["no such provider"], home=paths(home))
