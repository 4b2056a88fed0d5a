"""llama-cpp-python's high-level `Llama`: the independent reference some tests compare with.

It loads weights as Freehold's engine does (`freehold.engine.model.load_params`): on CPUs with
AMX, without llama.cpp's AMX matmul, which crashes there. `Llama` has no option for that, so
its default model parameters are adjusted while it loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as lc
from llama_cpp import Llama

from freehold.engine.model import cpu_has_amx


def reference_llama(path: Path, **kwargs: Any) -> Llama:
    original = lc.llama_model_default_params

    def as_freehold_loads() -> lc.llama_model_params:
        params = original()
        params.use_extra_bufts = not cpu_has_amx()
        return params

    lc.llama_model_default_params = as_freehold_loads
    try:
        return Llama(str(path), **kwargs)
    finally:
        lc.llama_model_default_params = original
