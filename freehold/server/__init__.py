"""Serve: an OpenAI-compatible HTTP API over Freehold's engine (`freehold serve`)."""

from freehold.server.settings import DEFAULT_PORT, ServerSettings

__all__ = ["DEFAULT_PORT", "ServerSettings"]
