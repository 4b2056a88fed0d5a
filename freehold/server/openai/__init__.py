"""OpenAI's API: chat completions, completions, embeddings, models (and Responses)."""

from freehold.server.door import Door
from freehold.server.openai import chat, completions, embeddings, models

DOOR = Door("openai", (chat.router, completions.router, embeddings.router, models.router))
