"""OpenAI's Batch API: files (`/v1/files`) and batches (`/v1/batches`), run in the background
on the local engine at low priority, state in SQLite so a batch survives a restart."""

from freehold.server.batches import routes
from freehold.server.door import Door

DOOR = Door("batches", (routes.router,))
