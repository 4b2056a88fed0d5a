"""License profiles: what the terms shipped with a model let a team do, in plain words.

The table lives in `data/licenses.json`. A profile is found from an identifier (GGUF
`general.license`, an SPDX id, a model-card tag) or from the text of a license file shipped
beside the weights. Anything unrecognised gets the "unknown — review before use" profile:
Freehold never guesses terms.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import cache
from importlib.resources import files
from typing import Any

UNKNOWN_ID = "unknown"


@dataclass(frozen=True)
class LicenseProfile:
    id: str
    name: str
    spdx: str | None
    commercial: str  # yes | no | conditional | unknown
    caps: str | None
    attribution: str | None
    use_policy: str | None
    policy_passes_to_derivatives: bool | None
    redistribution: str | None
    link: str | None

    @property
    def known(self) -> bool:
        return self.id != UNKNOWN_ID

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plain_words(self) -> list[str]:
        """The profile as short sentences for `freehold show`."""
        if not self.known:
            return ["License unknown: review the terms before any use."]
        lines = [f"License: {self.name} ({self.spdx})", f"Commercial use: {self.commercial}"]
        if self.caps:
            lines.append(f"Caps: {self.caps}")
        if self.attribution:
            lines.append(f"Attribution: {self.attribution}")
        if self.use_policy:
            passes = "passes" if self.policy_passes_to_derivatives else "does not pass"
            lines.append(f"Use policy: {self.use_policy} It {passes} to derivatives.")
        if self.redistribution:
            lines.append(f"Redistribution: {self.redistribution}")
        if self.link:
            lines.append(f"Terms: {self.link}")
        return lines


@dataclass(frozen=True)
class _Entry:
    profile: LicenseProfile
    match: tuple[str, ...]
    markers: tuple[str, ...]


def _profile(raw: dict[str, Any]) -> _Entry:
    fields = {k: v for k, v in raw.items() if k not in ("match", "markers")}
    return _Entry(
        LicenseProfile(**fields),
        tuple(_norm(m) for m in raw["match"]),
        tuple(m.lower() for m in raw["markers"]),
    )


@cache
def _table() -> tuple[tuple[_Entry, ...], LicenseProfile]:
    data = json.loads(files("freehold.vault").joinpath("data/licenses.json").read_text())
    entries = tuple(_profile(p) for p in data["profiles"])
    return entries, _profile(data["unknown"]).profile


def _norm(identifier: str) -> str:
    return re.sub(r"[\s_]+", "-", identifier.strip().lower())


def all_profiles() -> list[LicenseProfile]:
    return [e.profile for e in _table()[0]]


def unknown() -> LicenseProfile:
    return _table()[1]


def by_id(profile_id: str) -> LicenseProfile:
    for e in _table()[0]:
        if e.profile.id == profile_id:
            return e.profile
    return unknown()


def from_identifier(identifier: str | None) -> LicenseProfile | None:
    """Profile for an identifier such as 'apache-2.0', 'Apache-2.0' or 'gemma'; None if unknown."""
    if not identifier:
        return None
    key = _norm(identifier)
    for e in _table()[0]:
        spdx = _norm(e.profile.spdx or "")
        if key == e.profile.id or key == spdx or key in e.match:
            return e.profile
    return None


def from_text(text: str) -> LicenseProfile | None:
    """Profile whose marker phrase appears in a license file's text; None if none does."""
    flat = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).lower()
    for e in _table()[0]:
        if any(m in flat for m in e.markers):
            return e.profile
    return None


def resolve(identifiers: list[str | None], texts: list[str]) -> LicenseProfile:
    """Identifiers win over texts (they are what the publisher declared); else unknown."""
    for ident in identifiers:
        if p := from_identifier(ident):
            return p
    for text in texts:
        if p := from_text(text):
            return p
    return unknown()
