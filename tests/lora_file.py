"""A small LoRA GGUF for SmolLM2, written in a test's own folder (no tuning needed)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_lora(path: Path, scale: float) -> Path:
    """A LoRA on layer 0's V projection of SmolLM2 (576 wide, 3 KV heads of 64), rank 4."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    for layer in range(4):
        a = rng.standard_normal((4, 576)).astype(np.float32)
        b = (scale * rng.standard_normal((192, 4))).astype(np.float32)
        w.add_tensor(f"blk.{layer}.attn_v.weight.lora_a", a)
        w.add_tensor(f"blk.{layer}.attn_v.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
