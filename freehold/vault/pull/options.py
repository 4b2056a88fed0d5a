"""What a pull was asked for, and the callbacks it reports through."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from freehold.vault.pull.download import ProgressFactory

Say = Callable[[str], None]


@dataclass(frozen=True)
class PullOptions:
    file: str | None = None  # the exact GGUF to take (hf:)
    quant: str | None = None  # or the quant tag in its name, e.g. Q4_K_M (hf:)
    name: str | None = None  # NAME[:TAG] to catalog it under
    outtype: str | None = None  # safetensors-only repos: the GGUF float type (default f16)
    to: str | None = None  # ...and the quant type to quantize that to
    registry: str | None = None  # Ollama registry base URL (ollama:)


@dataclass(frozen=True)
class Reporter:
    progress: ProgressFactory
    say: Say


def announce(say: Say, base_url: str) -> None:
    """Egress is explicit: name the host before the first connection to it."""
    host = urlsplit(base_url).netloc or base_url
    say(f"Pulling from {host} ({base_url}) …")
