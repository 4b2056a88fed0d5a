"""License profiles: identifiers and texts map to terms; anything else is unknown, not a guess."""

from __future__ import annotations

import pytest

from freehold.vault import licenses

REQUIRED = [
    "apache-2.0",
    "mit",
    "llama3",
    "llama3.1",
    "llama3.2",
    "llama3.3",
    "gemma",
    "qwen",
    "qwen-research",
    "deepseek",
    "openrail-m",
    "cc-by-nc-4.0",
    "mistral-non-production",
    "modified-mit",
]


def test_table_covers_the_licenses_open_weights_ship_under() -> None:
    ids = {p.id for p in licenses.all_profiles()}
    assert set(REQUIRED) <= ids
    for p in licenses.all_profiles():
        assert p.commercial in ("yes", "no", "conditional")
        assert p.spdx and (
            p.spdx in ("Apache-2.0", "MIT", "CC-BY-NC-4.0") or p.spdx.startswith("LicenseRef-")
        )


@pytest.mark.parametrize(
    ("identifier", "expected", "commercial"),
    [
        ("apache-2.0", "apache-2.0", "yes"),
        ("Apache-2.0", "apache-2.0", "yes"),
        ("MIT", "mit", "yes"),
        ("llama3.1", "llama3.1", "conditional"),
        ("gemma", "gemma", "conditional"),
        ("cc-by-nc-4.0", "cc-by-nc-4.0", "no"),
        ("qwen-research", "qwen-research", "no"),
        ("creativeml-openrail-m", "openrail-m", "yes"),
    ],
)
def test_identifiers(identifier: str, expected: str, commercial: str) -> None:
    p = licenses.resolve([identifier], [])
    assert (p.id, p.commercial) == (expected, commercial)


def test_texts_are_recognised_specific_before_general() -> None:
    mit = "Permission is hereby granted, free of charge, to any person obtaining a copy"
    assert licenses.resolve([], [mit]).id == "mit"
    assert licenses.resolve([], ["Modified MIT License\n\n" + mit]).id == "modified-mit"
    html = "<html><title>Gemma Terms of Use</title></html>"
    assert licenses.resolve([None], [html]).id == "gemma"
    assert licenses.resolve([], ["LLAMA 3.2 COMMUNITY LICENSE AGREEMENT"]).id == "llama3.2"


def test_unknown_is_never_a_guess() -> None:
    p = licenses.resolve(["other", "some-new-license"], ["All rights reserved."])
    assert not p.known and p.commercial == "unknown"
    assert p.name == "unknown — review before use"
    assert p.plain_words() == ["License unknown: review the terms before any use."]
