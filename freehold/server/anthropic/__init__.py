"""Anthropic's Messages API (what Claude Code and the anthropic SDK speak)."""

from freehold.server.anthropic import messages
from freehold.server.anthropic.errors import error_response
from freehold.server.door import Door

DOOR = Door(
    "anthropic",
    (messages.router,),
    error_prefixes=("/v1/messages",),
    render_error=error_response,
)
