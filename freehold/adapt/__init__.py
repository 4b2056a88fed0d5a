"""Adapt: quantize and fine-tune models in the vault.

- Verbs, vault in and vault out: `quantize.quantize_model`, `tune.tune_model`,
  `merge.merge_model`, `convert.add_hf_folder` (a safetensors folder in, GGUF with lineage out).
- Machinery they use: `quantizer` (llama.cpp's quantizer, dry-run plans, `--fit`),
  `converter` (llama.cpp's convert_hf_to_gguf.py, fetched once from the sdist),
  `lora_trainer` (LoRA training on a CPU), `lora_gguf` (llama.cpp adapter files),
  `datasets` (training data, checked line by line).
- `summaries`: what the verbs print, as plain rows or JSON.
"""
