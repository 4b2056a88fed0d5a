"""OpenAI's Responses API (what Codex CLI and the OpenAI Agents SDK speak)."""

from freehold.server.door import Door
from freehold.server.responses import routes

DOOR = Door("responses", (routes.router,))
