"""The `tune` verb: vault model + JSONL in, a LoRA adapter GGUF in the vault out, with a report.

The training itself (transformers + PEFT on a CPU) lives in `freehold.adapt.lora_trainer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freehold.adapt import lora_trainer as trainer
from freehold.adapt.datasets import load_jsonl, split
from freehold.adapt.lora_gguf import write_adapter
from freehold.errors import InvalidInput
from freehold.vault.catalog import ModelRecord
from freehold.vault.store import Vault


@dataclass
class TuneReport:
    adapter: ModelRecord
    base: ModelRecord
    result: trainer.TuneResult
    kl_from_base: float
    examples: list[dict[str, str]]
    merged: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.ref,
            "adapter_digest": self.adapter.digest,
            "base": self.base.ref,
            "result": self.result.to_dict(),
            "kl_from_base": self.kl_from_base,
            "examples": self.examples,
            "merged": self.merged,
        }


def work_dir(vault: Vault, base: ModelRecord, data: Path) -> Path:
    """Where checkpoints live: stable per (base, dataset) so --resume finds them."""
    return vault.home.root / "tune" / f"{base.name.replace('/', '-')}-{base.tag}-{data.stem}"


def tune_model(
    vault: Vault,
    ref: str,
    data: Path,
    config: trainer.TuneConfig,
    name: str | None = None,
    resume: bool = False,
    examples: int = 3,
    on_step: Callable[[trainer.Progress], None] | None = None,
) -> TuneReport:
    base = vault.get(ref)
    if base.kind != "model":
        raise InvalidInput(f"{base.ref} is an adapter: tune a base model")
    target = name or f"{base.name}-lora:{data.stem.lower()}"
    if vault.catalog.find(target) is not None:
        raise InvalidInput(f"'{target}' already exists in the vault: choose another --name")
    load_jsonl(data)  # fail on bad data before loading any weights
    gguf = vault.resolve_model_path(base.ref)  # a kept safetensors folder: says which GGUF
    trainer.template_source(gguf, base.ref)
    out = work_dir(vault, base, data)
    out.mkdir(parents=True, exist_ok=True)
    result, model, tokenizer, _ = trainer.train(gguf, data, out, config, resume, on_step)

    from peft import get_peft_model_state_dict

    partial = vault.home.tmp / f"adapter-{os.getpid()}.gguf.partial"
    try:
        state = get_peft_model_state_dict(model, save_embedding_layers=False)
        write_adapter(partial, state, config.alpha, gguf, base.digest)
        derivation = {
            "operation": "lora",
            "rank": config.rank,
            "alpha": config.alpha,
            "lr": config.lr,
            "epochs": config.epochs,
            "max_seq_len": config.max_seq_len,
            "dataset": str(data),
            "steps": result.steps,
            "val_loss_before": result.val_loss_before,
            "val_loss_after": result.val_loss_after,
        }
        filename = f"{base.name.replace('/', '-')}-lora-{data.stem}.gguf"
        adapter = vault.add_derived(partial, target, base, derivation, link=True, filename=filename)
    finally:
        partial.unlink(missing_ok=True)

    from freehold.measure.eval import default_text

    template = trainer.chat_template(gguf, tokenizer)
    _, val = split(load_jsonl(data), config.val_fraction, config.seed)
    kl = trainer.kl_from_base(model, tokenizer, default_text())
    rows = trainer.side_by_side(model, tokenizer, template, val[:examples])
    return TuneReport(adapter, base, result, kl, rows)
