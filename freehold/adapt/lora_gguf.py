"""Write a PEFT LoRA adapter as a llama.cpp LoRA GGUF, and merge one into its base.

llama.cpp's adapter format: `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and per target `<gguf tensor name>.lora_a` [r, in] and `.lora_b`
[out, r]. Names map from Hugging Face to GGUF through `gguf.TensorNameMap`. llama.cpp's
converter permutes the rows of Q and K for llama-family models (rope layout) and
transformers un-permutes them when it loads a GGUF, so B of q_proj / k_proj is permuted
back here; without that, the adapter loads but computes the wrong thing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from freehold.errors import InvalidInput
from freehold.vault.gguf_meta import read_header

PERMUTED_ARCHES = {"llama"}  # architectures whose Q/K rows llama.cpp's converter permutes
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _arch(name: str) -> gguf.MODEL_ARCH:
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise InvalidInput(f"architecture {name!r} is not known to the gguf package")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face row order → llama.cpp's, as its converter does for Q and K weights."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(state: dict[str, Any], base_meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """PEFT state dict (lora_A / lora_B per module) → GGUF tensor name → float32 array."""
    arch_name = str(base_meta["general.architecture"])
    n_blocks = int(base_meta[f"{arch_name}.block_count"])
    names = gguf.TensorNameMap(_arch(arch_name), n_blocks)
    heads = int(base_meta[f"{arch_name}.attention.head_count"])
    kv_heads = int(base_meta.get(f"{arch_name}.attention.head_count_kv", heads))
    out: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise InvalidInput(f"unexpected tensor {key!r} in the adapter: only LoRA A/B")
        target = names.get_name(m["module"] + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise InvalidInput(f"no GGUF tensor for {m['module']!r} in {arch_name}")
        w = tensor.detach().float().cpu().numpy()
        if m["ab"] == "B" and arch_name in PERMUTED_ARCHES:
            if target.endswith("attn_q.weight"):
                w = permute_rows(w, heads)
            elif target.endswith("attn_k.weight"):
                w = permute_rows(w, kv_heads)
        out[f"{target}.lora_{m['ab'].lower()}"] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def write_adapter(
    path: Path,
    state: dict[str, Any],
    alpha: float,
    base: Path,
    base_digest: str | None = None,
    name: str | None = None,
) -> Path:
    """Write the adapter GGUF (to `path`, which the caller moves into place)."""
    meta, _ = read_header(base)
    arch_name = str(meta["general.architecture"])
    tensors = gguf_tensors(state, meta)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    writer.add_string("general.name", name or "freehold LoRA adapter")
    writer.add_uint32("general.base_model.count", 1)
    writer.add_string("general.base_model.0.name", str(meta.get("general.name", "")))
    if base_digest:
        writer.add_string("freehold.base_model.digest", base_digest)
    for tensor_name, data in sorted(tensors.items()):
        writer.add_tensor(tensor_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
