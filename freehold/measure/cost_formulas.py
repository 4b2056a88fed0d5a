"""What a token costs on hardware you own or rent, and how that compares with an API. Pure.

$/1M tokens = 1e6 x (hardware $/h + energy $/h + ops $/h) / (tok/s x 3600 x utilisation)

- hardware $/h = purchase price / lifetime hours (owned), or the hourly rent (rented);
- energy $/h = average kW x PUE x $/kWh, where the average draw mixes load and idle watts by
  utilisation (the machine is paid for and powered every hour, busy or not). Rented hardware
  is assumed to include power in its rent, so energy is zero there;
- input tokens use the prefill rate, output tokens the decode rate;
- blended = (3 x input + 1 x output) / 4, as Artificial Analysis blends.
"""

from __future__ import annotations

from dataclasses import dataclass

HOURS_PER_MONTH = 730.0  # 8760 h / 12
BLEND_INPUT, BLEND_OUTPUT = 3.0, 1.0


@dataclass(frozen=True)
class CostInputs:
    """The money side of a machine. Either purchase price + lifetime hours, or hourly rent."""

    utilisation: float
    purchase_usd: float | None = None
    lifetime_hours: float | None = None
    rent_usd_per_hour: float | None = None
    watts_load: float = 0.0
    watts_idle: float = 0.0
    usd_per_kwh: float = 0.0
    pue: float = 1.0
    ops_usd_per_hour: float = 0.0

    @property
    def rented(self) -> bool:
        return self.rent_usd_per_hour is not None


@dataclass(frozen=True)
class Hourly:
    """Dollars per wall-clock hour, split by cause."""

    hardware: float
    energy: float
    ops: float

    @property
    def total(self) -> float:
        return self.hardware + self.energy + self.ops


@dataclass(frozen=True)
class LocalCost:
    """$ per 1M tokens on this machine at the stated utilisation."""

    input_per_mtok: float
    output_per_mtok: float
    blended_per_mtok: float
    hourly: Hourly
    utilisation: float


@dataclass(frozen=True)
class Comparison:
    """Local cost beside one API's price; savings are % of the API price (negative: dearer)."""

    input_savings_pct: float
    output_savings_pct: float
    blended_savings_pct: float
    api_blended_per_mtok: float
    break_even_mtok_per_month: float | None
    capacity_mtok_per_month: float

    @property
    def break_even_within_capacity(self) -> bool:
        be = self.break_even_mtok_per_month
        return be is not None and be <= self.capacity_mtok_per_month


def hardware_per_hour(c: CostInputs) -> float:
    if c.rent_usd_per_hour is not None:
        return c.rent_usd_per_hour
    if c.purchase_usd is None or not c.lifetime_hours:
        raise ValueError("owned hardware needs a purchase price and lifetime hours")
    return c.purchase_usd / c.lifetime_hours


def average_kw(c: CostInputs) -> float:
    return (c.utilisation * c.watts_load + (1.0 - c.utilisation) * c.watts_idle) / 1000.0


def energy_per_hour(c: CostInputs) -> float:
    if c.rented:
        return 0.0
    return average_kw(c) * c.pue * c.usd_per_kwh


def hourly(c: CostInputs) -> Hourly:
    return Hourly(hardware_per_hour(c), energy_per_hour(c), c.ops_usd_per_hour)


def usd_per_mtok(usd_per_hour: float, tokens_per_s: float, utilisation: float) -> float:
    """The formula itself: what one million tokens costs when busy `utilisation` of the time."""
    if tokens_per_s <= 0 or utilisation <= 0:
        raise ValueError("tokens/s and utilisation must be positive")
    return 1e6 * usd_per_hour / (tokens_per_s * 3600.0 * utilisation)


def blend(input_price: float, output_price: float) -> float:
    return (BLEND_INPUT * input_price + BLEND_OUTPUT * output_price) / (BLEND_INPUT + BLEND_OUTPUT)


def local_cost(c: CostInputs, prefill_tps: float, decode_tps: float) -> LocalCost:
    h = hourly(c)
    cin = usd_per_mtok(h.total, prefill_tps, c.utilisation)
    cout = usd_per_mtok(h.total, decode_tps, c.utilisation)
    return LocalCost(cin, cout, blend(cin, cout), h, c.utilisation)


def savings_pct(local: float, api: float) -> float:
    """How much cheaper local is, as % of the API price; negative when local costs more."""
    if api <= 0:
        return float("-inf") if local > 0 else 0.0
    return 100.0 * (1.0 - local / api)


def blended_busy_hours_per_mtok(prefill_tps: float, decode_tps: float) -> float:
    """Busy hours to process 1M tokens in the 3:1 input:output mix."""
    seconds_per_token = (BLEND_INPUT / prefill_tps + BLEND_OUTPUT / decode_tps) / (
        BLEND_INPUT + BLEND_OUTPUT
    )
    return 1e6 * seconds_per_token / 3600.0


def fixed_per_month(c: CostInputs) -> float:
    """What owning (or renting around the clock) costs a month with no tokens at all."""
    idle_energy = 0.0 if c.rented else c.watts_idle / 1000.0 * c.pue * c.usd_per_kwh
    return (hardware_per_hour(c) + c.ops_usd_per_hour + idle_energy) * HOURS_PER_MONTH


def marginal_per_mtok(c: CostInputs, prefill_tps: float, decode_tps: float) -> float:
    """Extra energy that 1M blended tokens draw above idle."""
    if c.rented:
        return 0.0
    extra_kw = max(c.watts_load - c.watts_idle, 0.0) / 1000.0
    return blended_busy_hours_per_mtok(prefill_tps, decode_tps) * extra_kw * c.pue * c.usd_per_kwh


def break_even_mtok_per_month(
    c: CostInputs, prefill_tps: float, decode_tps: float, api_blended: float
) -> float | None:
    """Monthly blended volume (millions) where the machine's monthly cost equals API spend.

    None when the API is cheaper than even the marginal energy of a local token.
    """
    margin = api_blended - marginal_per_mtok(c, prefill_tps, decode_tps)
    if margin <= 0:
        return None
    return fixed_per_month(c) / margin


def capacity_mtok_per_month(prefill_tps: float, decode_tps: float) -> float:
    """Blended millions of tokens a month the machine can do flat out."""
    return HOURS_PER_MONTH / blended_busy_hours_per_mtok(prefill_tps, decode_tps)


def compare(
    c: CostInputs,
    local: LocalCost,
    prefill_tps: float,
    decode_tps: float,
    api_input: float,
    api_output: float,
) -> Comparison:
    api_blended = blend(api_input, api_output)
    return Comparison(
        input_savings_pct=savings_pct(local.input_per_mtok, api_input),
        output_savings_pct=savings_pct(local.output_per_mtok, api_output),
        blended_savings_pct=savings_pct(local.blended_per_mtok, api_blended),
        api_blended_per_mtok=api_blended,
        break_even_mtok_per_month=break_even_mtok_per_month(
            c, prefill_tps, decode_tps, api_blended
        ),
        capacity_mtok_per_month=capacity_mtok_per_month(prefill_tps, decode_tps),
    )
