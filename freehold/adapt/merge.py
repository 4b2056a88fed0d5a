"""Merge a LoRA adapter into its base: W' = W + (alpha / r) · B·A, then quantize the result.

Everything happens in llama.cpp's own layout: the adapter GGUF already holds A and B as
llama.cpp uses them, so no name or row-order mapping is repeated here. The base is unpacked
to float32, merged, written as an F32 GGUF with the base's metadata, and quantized once to
the chosen type (merging into quantized blocks and quantizing again would lose twice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from freehold.adapt.quantizer import QUANT_TYPES, check_type, quantize
from freehold.errors import InvalidInput
from freehold.vault.catalog import ModelRecord
from freehold.vault.store import Vault

_SKIP_KEYS = {"general.architecture", "general.file_type", "general.alignment"}


def _lora_pairs(adapter: gguf.GGUFReader) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    field = adapter.get_field("adapter.lora.alpha")
    if adapter.get_field("adapter.type") is None or field is None:
        raise InvalidInput("that file is not a llama.cpp LoRA adapter (no adapter.lora.alpha)")
    alpha = float(field.contents())
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in adapter.tensors}
    pairs = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            target = name.removesuffix(".lora_a")
            pairs[target] = (a, tensors[target + ".lora_b"])
    return pairs, alpha


def _copy_metadata(base: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for key, field in base.fields.items():
        if key.startswith("GGUF.") or key in _SKIP_KEYS:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def merge_to_f32(base_path: Path, adapter_path: Path, out: Path) -> int:
    """Write the merged model as F32; returns how many tensors the adapter changed."""
    base = gguf.GGUFReader(base_path)
    pairs, alpha = _lora_pairs(gguf.GGUFReader(adapter_path))
    arch = str(base.get_field("general.architecture").contents())
    writer = gguf.GGUFWriter(str(out), arch)
    _copy_metadata(base, writer)
    changed = 0
    for t in base.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name in pairs:
            a, b = pairs.pop(t.name)
            w = w + (alpha / a.shape[0]) * (b @ a)
            changed += 1
        writer.add_tensor(t.name, np.ascontiguousarray(w))
    if pairs:
        raise InvalidInput(
            f"the adapter targets tensors the base does not have ({next(iter(pairs))}): "
            "it was trained for another model"
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return changed


@dataclass
class Merged:
    record: ModelRecord
    changed_tensors: int


def merge_model(
    vault: Vault, base_ref: str, adapter_ref: str, qtype: str = "Q8_0", name: str | None = None
) -> Merged:
    """Merge a vault adapter into its base, quantize, and store it with lineage to the base."""
    qtype = check_type(qtype)
    base, adapter = vault.get(base_ref), vault.get(adapter_ref)
    if adapter.kind != "adapter" or base.kind != "model":
        raise InvalidInput(
            f"merge takes a base model and an adapter, not {base.ref}, {adapter.ref}"
        )
    target = name or f"{adapter.name}-merged:{qtype.lower()}"
    if vault.catalog.find(target) is not None:
        raise InvalidInput(f"'{target}' already exists in the vault: choose another --name")
    stem = vault.home.tmp / f"merge-{os.getpid()}"
    f32, out = stem.with_suffix(".f32.partial"), stem.with_suffix(f".{qtype}.partial")
    try:
        changed = merge_to_f32(vault.blob_path(base), vault.blob_path(adapter), f32)
        if qtype == "F32":
            os.replace(f32, out)
        else:
            quantize(f32, out, qtype, threads=None)
        derivation = {
            "operation": "merge",
            "adapter": adapter.ref,
            "adapter_digest": adapter.digest,
            "type": qtype,
            "merged_tensors": changed,
        }
        filename = f"{adapter.name.replace('/', '-')}-merged-{qtype}.gguf"
        record = vault.add_derived(out, target, base, derivation, link=True, filename=filename)
    finally:
        f32.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    return Merged(record, changed)


__all__ = ["QUANT_TYPES", "Merged", "merge_model", "merge_to_f32"]
