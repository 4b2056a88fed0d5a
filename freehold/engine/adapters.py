"""LoRA adapters on a context: every sequence a context decodes runs base + adapters.

llama.cpp applies adapters per context, not per sequence, so a server that serves a model
with and without an adapter at once runs two engines (two contexts) side by side. Takes the
raw model pointer so that eval's own contexts use the same code.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as ll

from freehold.errors import InvalidInput


def attach_lora(
    model: ll.llama_model_p, ctx: ll.llama_context_p, paths: Sequence[str | Path], base: str
) -> None:
    """Load each adapter for `model` and set them all, at scale 1, on `ctx`.

    The adapters belong to the model from then on: llama.cpp frees them with it.
    """
    if not paths:
        return
    loaded = []
    for path in paths:
        adapter = ll.llama_adapter_lora_init(model, str(path).encode())
        if not adapter:
            raise InvalidInput(
                f"{path} is not a LoRA adapter for {base}: it may be for another base model "
                "or not an adapter at all"
            )
        loaded.append(adapter)
    arr = (ll.llama_adapter_lora_p_ctypes * len(loaded))(*loaded)
    scales = (ctypes.c_float * len(loaded))(*([1.0] * len(loaded)))
    if ll.llama_set_adapters_lora(ctx, arr, len(loaded), scales) != 0:
        raise InvalidInput(f"llama.cpp could not apply the adapters to {base}")
