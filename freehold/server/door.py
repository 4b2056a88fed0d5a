"""What a front door (one API family) gives the app factory: its routes, and how its errors
look on the paths it owns."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter

from freehold.server.errors import Renderer


@dataclass(frozen=True)
class Door:
    name: str
    routers: tuple[APIRouter, ...]
    # Paths whose errors this door renders (its own JSON shape); OpenAI's is the default.
    error_prefixes: tuple[str, ...] = ()
    render_error: Renderer | None = None
