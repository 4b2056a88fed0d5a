"""LoRA adapters on `eval`'s raw llama.cpp model and context.

The engine has the same on its `Model` objects (`freehold.engine.adapters.attach_lora`); eval
loads models without that class (it also needs vocab-only loads), so it keeps this one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from freehold.errors import FreeholdError, InvalidInput


def apply_adapters(model: Any, ctx: Any, paths: Sequence[Path], scale: float = 1.0) -> None:
    """Load each adapter for `model` and set them all on `ctx` at `scale`.

    The adapters belong to the model from then on: llama.cpp frees them with it.
    """
    import llama_cpp as ll

    if not paths:
        return
    loaded = []
    for p in paths:
        adapter = ll.llama_adapter_lora_init(model, str(p).encode())
        if not adapter:
            raise InvalidInput(f"{p} is not a LoRA adapter that fits this base model")
        loaded.append(adapter)
    arr = (ll.llama_adapter_lora_p_ctypes * len(loaded))(*loaded)
    scales = (ctypes.c_float * len(loaded))(*([scale] * len(loaded)))
    if ll.llama_set_adapters_lora(ctx, arr, len(loaded), scales) != 0:
        raise FreeholdError("llama.cpp could not apply the LoRA adapters")
