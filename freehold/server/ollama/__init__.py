"""Ollama's API (the subset its popular clients use): see docs/ollama.md."""

from freehold.server.door import Door
from freehold.server.ollama import embed, http, models, pull, routes

DOOR = Door(
    "ollama",
    (models.router, routes.router, embed.router, pull.router),
    error_prefixes=("/api/",),
    render_error=http.error_response,
)
