"""The `quantize` verb: a vault model in, a quantized model with lineage in the vault out.

The llama.cpp machinery (dry-run plans, `--fit` choice, the quantizer itself) lives in
`freehold.adapt.quantizer`; this module only ties it to the vault and measures the loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import llama_cpp as ll

from freehold.adapt.quantizer import FitChoice, Quantized, check_type, choose_fit, quantize
from freehold.config import parse_size
from freehold.engine.devices import GpuLayers, check_request, detect
from freehold.errors import InvalidInput
from freehold.measure.eval import EvalResult, evaluate
from freehold.vault.catalog import ModelRecord
from freehold.vault.store import Vault


@dataclass
class QuantizeReport:
    record: ModelRecord
    source: ModelRecord
    result: Quantized
    fit: FitChoice | None
    quality: EvalResult | None


def quantize_model(
    vault: Vault,
    ref: str,
    qtype: str | None = None,
    fit: str | None = None,
    ctx: int = 4096,
    name: str | None = None,
    allow_requantize: bool = False,
    eval_chunks: int | None = 8,
    *,
    gpu_layers: GpuLayers = "auto",
) -> QuantizeReport:
    """Quantize a vault model, store the result with its lineage, and measure what it lost.

    `gpu_layers` is where the KL check runs (`--gpu-layers`); quantizing itself is CPU work.
    """
    if (qtype is None) == (fit is None):
        raise InvalidInput("give exactly one of --to TYPE or --fit SIZE")
    if eval_chunks:
        check_request(gpu_layers, detect())  # refused before quantizing, not after
    source = vault.get(ref)
    src = vault.resolve_model_path(source.ref)  # a kept safetensors folder: says which GGUF
    choice = choose_fit(src, parse_size(fit), ctx) if fit else None
    if choice is not None and choice.chosen is None:
        raise InvalidInput(choice.explain())
    qtype = choice.chosen.qtype if choice and choice.chosen else check_type(qtype or "")
    target = name or f"{source.name}:{qtype.lower()}"
    if vault.catalog.find(target) is not None:
        raise InvalidInput(f"'{target}' already exists in the vault: choose another --name")
    out = vault.home.tmp / f"quantize-{os.getpid()}-{qtype}.gguf.partial"
    try:
        result = quantize(src, out, qtype, allow_requantize, label=source.ref)
        derivation = {
            "operation": "quantize",
            "type": qtype,
            "from_type": result.source_quantization,
            "allow_requantize": allow_requantize,
            "fallback_tensors": len(result.plan.fallbacks),
            "fit": {"budget_bytes": choice.budget_bytes, "ctx": ctx} if choice else None,
            "tool": f"llama.cpp (llama-cpp-python {ll.__version__})",
        }
        filename = f"{source.name.replace('/', '-')}-{qtype}.gguf"
        record = vault.add_derived(out, target, source, derivation, link=True, filename=filename)
    finally:
        out.unlink(missing_ok=True)
    quality = None
    if eval_chunks:
        quality = evaluate(
            vault.blob_path(record), src, max_chunks=eval_chunks, gpu_layers=gpu_layers
        )
    return QuantizeReport(record, source, result, choice, quality)
