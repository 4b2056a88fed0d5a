"""The machine a cost is for: what it is (detected) and what it costs (set by the user).

The money side is kept under the `hardware` key of FREEHOLD_HOME's settings JSON, written
atomically. Values the user never set fall back to stated defaults, and every value says
where it came from so reports can label it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from freehold.atomic import write_text
from freehold.config import Paths, read_settings
from freehold.errors import InvalidInput
from freehold.measure.cost_formulas import CostInputs

SETTINGS_KEY = "hardware"

# Defaults for a desk machine, labelled "default (assumed)" wherever they are shown.
DEFAULTS: dict[str, float] = {
    "price_usd": 1500.0,
    "lifetime_hours": 26280.0,  # three years around the clock
    "utilisation": 0.5,
    "watts_load": 65.0,
    "watts_idle": 15.0,
    "usd_per_kwh": 0.17,
    "pue": 1.0,  # no data-centre cooling overhead at a desk
    "ops_usd_per_hour": 0.0,
}
# Keys that have no default: renting is opt-in.
OPTIONAL_KEYS = ("rent_usd_per_hour",)
KEYS = tuple(DEFAULTS) + OPTIONAL_KEYS

DESCRIPTIONS = {
    "price_usd": "purchase price of the machine, USD",
    "lifetime_hours": "hours the machine is written off over",
    "rent_usd_per_hour": "hourly rent instead of a purchase (power assumed included)",
    "utilisation": "share of hours the machine is busy, 0-1 (or a percentage like 50%)",
    "watts_load": "watts drawn under load",
    "watts_idle": "watts drawn idle",
    "usd_per_kwh": "electricity price, USD per kWh",
    "pue": "power usage effectiveness (1.0 at a desk, ~1.2-1.6 in a data centre)",
    "ops_usd_per_hour": "operations (people, space, network), USD per hour",
}


@dataclass(frozen=True)
class Machine:
    """What was detected about this machine."""

    cpu: str
    cores: int
    ram_gib: float
    gpus: list[str]


@dataclass(frozen=True)
class Profile:
    """The money side of the machine, with each value's origin: 'set' or 'default (assumed)'."""

    values: dict[str, float]
    origin: dict[str, str]

    @property
    def rented(self) -> bool:
        return "rent_usd_per_hour" in self.values

    def cost_inputs(self) -> CostInputs:
        v = self.values
        return CostInputs(
            utilisation=v["utilisation"],
            purchase_usd=None if self.rented else v["price_usd"],
            lifetime_hours=None if self.rented else v["lifetime_hours"],
            rent_usd_per_hour=v.get("rent_usd_per_hour"),
            watts_load=v["watts_load"],
            watts_idle=v["watts_idle"],
            usd_per_kwh=v["usd_per_kwh"],
            pue=v["pue"],
            ops_usd_per_hour=v["ops_usd_per_hour"],
        )


# ---- detection ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _gpus() -> list[str]:
    """NVIDIA GPUs via nvidia-smi; none when the tool is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def detect() -> Machine:
    return Machine(cpu=_cpu_model(), cores=os.cpu_count() or 1, ram_gib=_ram_gib(), gpus=_gpus())


# ---- persistence ----------------------------------------------------------------------------


def load_profile(home: Paths) -> Profile:
    saved = read_settings(home).get(SETTINGS_KEY, {}) or {}
    values: dict[str, float] = {}
    origin: dict[str, str] = {}
    for key in KEYS:
        if key in saved:
            try:
                values[key], origin[key] = float(saved[key]), "set"
            except (TypeError, ValueError):
                raise InvalidInput(
                    f"{home.settings}: hardware.{key} = {saved[key]!r} is not a number: "
                    f"fix it with `freehold cost --set {key}=VALUE`"
                ) from None
        elif key in DEFAULTS:
            values[key], origin[key] = DEFAULTS[key], "default (assumed)"
    return Profile(values, origin)


def parse_value(key: str, raw: str) -> float:
    """Check one `key=value` from `--set`; a trailing % is allowed for utilisation."""
    if key not in KEYS:
        raise InvalidInput(f"unknown cost setting {key!r}: use one of {', '.join(KEYS)}")
    text = raw.strip().replace("$", "").replace(",", "")
    scale = 1.0
    if key == "utilisation" and text.endswith("%"):
        text, scale = text[:-1], 0.01
    try:
        value = float(text) * scale
    except ValueError:
        raise InvalidInput(f"cost setting {key}={raw!r} is not a number") from None
    if key == "utilisation" and not 0 < value <= 1:
        raise InvalidInput(f"utilisation must be in (0, 1] (or 1-100%), got {raw!r}")
    if key == "pue" and value < 1:
        raise InvalidInput(f"PUE is at least 1.0, got {raw!r}")
    if key == "lifetime_hours" and value <= 0:
        raise InvalidInput(f"lifetime_hours must be positive, got {raw!r}")
    if value < 0:
        raise InvalidInput(f"cost setting {key}={raw!r} must not be negative")
    return value


def set_profile(assignments: list[str], home: Paths) -> Profile:
    """Apply `key=value` assignments (`key=` forgets a value) and save them atomically."""
    changes: dict[str, float | None] = {}
    # `--set "a=1 b=2"` and repeated `--set a=1 --set b=2` both work.
    for item in (part for a in assignments for part in a.split()):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise InvalidInput(f"--set takes key=value, got {item!r}")
        if raw.strip() == "":
            if key not in KEYS:
                raise InvalidInput(f"unknown cost setting {key!r}: use one of {', '.join(KEYS)}")
            changes[key] = None
        else:
            changes[key] = parse_value(key, raw)
    settings = read_settings(home)
    saved = dict(settings.get(SETTINGS_KEY, {}) or {})
    for key, value in changes.items():
        if value is None:
            saved.pop(key, None)
        else:
            saved[key] = value
    settings[SETTINGS_KEY] = saved
    write_text(home.settings, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return load_profile(home)
