"""LoRA adapters on a context: every sequence an engine decodes runs base + adapters.

llama.cpp applies adapters per context, not per sequence, so a server that serves a model
with and without an adapter at once runs two engines (two contexts) side by side.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as ll

from freehold.engine.model import Model
from freehold.errors import InvalidInput


def attach_lora(model: Model, ctx: ll.llama_context_p, paths: Sequence[str | Path]) -> None:
    """Load each adapter for `model` and set them all, at scale 1, on `ctx`."""
    if not paths:
        return
    loaded = []
    for path in paths:
        adapter = ll.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not adapter:
            raise InvalidInput(
                f"{path} is not a LoRA adapter for {model.path.name}: it may be for another "
                "base model or not an adapter at all"
            )
        loaded.append(adapter)
    arr = (ll.llama_adapter_lora_p_ctypes * len(loaded))(*loaded)
    scales = (ctypes.c_float * len(loaded))(*([1.0] * len(loaded)))
    if ll.llama_set_adapters_lora(ctx, arr, len(loaded), scales) != 0:
        raise InvalidInput(f"llama.cpp could not apply the adapters to {model.path.name}")
