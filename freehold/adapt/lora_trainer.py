"""LoRA fine-tuning on a CPU: GGUF weights and chat data in, a trained LoRA model out.

The base GGUF is loaded into transformers (dequantized to float32), LoRA goes on the attention
and MLP projections (never the tied embeddings / lm_head), and the loss counts only the
assistant's tokens as the model's own chat template lays them out. Checkpoints are written
atomically every N steps and on Ctrl-C, so an interrupted run resumes where it stopped.
Needs the `[tune]` extra (torch==2.13.0, transformers, peft, accelerate).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freehold.adapt.datasets import Example, load_jsonl, split
from freehold.engine.chat_template import ChatTemplate
from freehold.errors import FreeholdError, InvalidInput
from freehold.vault.gguf_meta import read_header

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


@dataclass
class TuneConfig:
    rank: int = 16
    alpha: float = 32.0
    lr: float = 2e-4
    epochs: int = 3
    max_seq_len: int = 512
    batch_size: int = 4
    val_fraction: float = 0.1
    seed: int = 0
    checkpoint_every: int = 20
    threads: int | None = None


@dataclass
class Tokenized:
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE outside assistant turns


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float


@dataclass
class TuneResult:
    adapter_dir: Path
    steps: int
    train_tokens: int
    seconds: float
    tokens_per_s: float
    val_loss_before: float
    val_loss_after: float
    peak_rss_bytes: int
    config: TuneConfig
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        return d


class Interrupted(FreeholdError):
    """Training stopped by the user; a checkpoint was written."""

    exit_code = 130


def _require_torch() -> Any:
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise FreeholdError(
            "fine-tuning needs the [tune] extra: pip install 'freehold[tune]' "
            "(it pins torch==2.13.0, a CPU build)"
        ) from None
    return torch


# -- the base model --------------------------------------------------------------------------


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(gguf: Path) -> Any:
    _require_torch()
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_model(gguf: Path, threads: int | None = None) -> Any:
    """A transformers model from a GGUF, as a plain float32 model ready to train."""
    torch = _require_torch()
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    torch.set_num_threads(threads or _cores())
    # transformers' GGUF loader draws its own tqdm bar; Freehold shows its own progress.
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
    # transformers leaves a GGUF-loaded model flagged as quantized, which stops training and
    # saving; the weights are already plain float32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    return model


def load_base(gguf: Path, threads: int | None = None) -> tuple[Any, Any]:
    """Model and tokenizer of a GGUF, for training or for comparing against llama.cpp."""
    return load_model(gguf, threads), load_tokenizer(gguf)


def _cores() -> int:
    from freehold.engine.model import physical_cores

    return physical_cores()


def template_source(gguf: Path, label: str | None = None) -> str:
    """The GGUF's chat template, read from its header alone (fast: no weights loaded)."""
    meta, _ = read_header(gguf)
    source = meta.get("tokenizer.chat_template")
    if not isinstance(source, str):
        raise InvalidInput(
            f"{label or gguf.name} has no chat template (a base model): tune an instruct model, "
            "whose template says where the assistant's turns are"
        )
    return source


def chat_template(gguf: Path, tokenizer: Any) -> ChatTemplate:
    source = template_source(gguf)
    return ChatTemplate(
        source, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or ""
    )


# -- data: the model's own template, loss on the assistant's tokens only --------------------


def assistant_spans(template: ChatTemplate, messages: list[dict[str, str]]) -> tuple[str, list]:
    """The rendered conversation and the character spans of each assistant turn."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True) if i else ""
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if not through.startswith(before):
            raise InvalidInput("the chat template renders earlier turns differently later")
        spans.append((len(before), len(through)))
    return template.render(messages, add_generation_prompt=False), spans


def tokenize(
    examples: list[Example], template: ChatTemplate, tokenizer: Any, max_len: int, path: Path
) -> list[Tokenized]:
    out = []
    for ex in examples:
        text, spans = assistant_spans(template, ex.messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if len(ids) > max_len:
            raise InvalidInput(
                f"{path}:{ex.line}: the conversation is {len(ids)} tokens, longer than "
                f"--max-seq-len {max_len}: shorten it or raise --max-seq-len"
            )
        labels = [
            tok if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE
            for tok, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        if all(label == IGNORE for label in labels):
            raise InvalidInput(f"{path}:{ex.line}: the assistant's turn has no tokens")
        out.append(Tokenized(ex.line, ids, labels))
    return out


def _batches(data: list[Tokenized], size: int, seed: int, epoch: int) -> list[list[Tokenized]]:
    order = list(range(len(data)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [[data[i] for i in order[k : k + size]] for k in range(0, len(order), size)]


def _collate(batch: list[Tokenized], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, t in enumerate(batch):
        n = len(t.input_ids)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
    return ids, labels, mask


def batch_loss(model: Any, batch: list[Tokenized], pad: int) -> tuple[Any, int]:
    """Mean cross-entropy over the assistant tokens of a batch, and how many there were."""
    import torch.nn.functional as F

    ids, labels, mask = _collate(batch, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE
    )
    return loss, int((target != IGNORE).sum())


def evaluate_loss(model: Any, data: list[Tokenized], pad: int, batch_size: int) -> float:
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for k in range(0, len(data), batch_size):
            loss, n = batch_loss(model, data[k : k + batch_size], pad)
            total += float(loss) * n
            count += n
    return total / max(count, 1)


# -- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(model: Any, optimizer: Any, state: dict[str, Any], out: Path) -> None:
    """Write to a fresh directory, then swap it in: a crash never leaves a half checkpoint."""
    import torch

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), save_embedding_layers=False)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(model: Any, optimizer: Any, ckpt: Path) -> dict[str, Any]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state_file = ckpt / "trainer_state.json"
    if not state_file.is_file():
        raise InvalidInput(f"no checkpoint to resume at {ckpt}: run without --resume")
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt"))
    return json.loads(state_file.read_text())


# -- training --------------------------------------------------------------------------------


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(
    gguf: Path,
    data_path: Path,
    out_dir: Path,
    config: TuneConfig,
    resume: bool = False,
    on_step: Callable[[Progress], None] | None = None,
) -> tuple[TuneResult, Any, Any, list[Tokenized]]:
    """Train a LoRA adapter; returns the result, the PEFT model, tokenizer and validation data."""
    torch = _require_torch()
    from peft import LoraConfig, get_peft_model

    # Everything about the data is checked before the weights are loaded.
    examples = load_jsonl(data_path)
    train_ex, val_ex = split(examples, config.val_fraction, config.seed)
    template_source(gguf)
    tokenizer = load_tokenizer(gguf)
    template = chat_template(gguf, tokenizer)
    train_data = tokenize(train_ex, template, tokenizer, config.max_seq_len, data_path)
    val_data = tokenize(val_ex, template, tokenizer, config.max_seq_len, data_path)
    base = load_model(gguf, config.threads)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=TARGETS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    ckpt = out_dir / "checkpoint"
    state = {"epoch": 0, "batch": 0, "step": 0, "tokens": 0, "seconds": 0.0, "history": []}
    if resume:
        state = load_checkpoint(model, optimizer, ckpt)
        val_before = state["val_loss_before"]
    else:
        val_before = evaluate_loss(model, val_data, pad, config.batch_size)
        state["val_loss_before"] = val_before

    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total = steps_per_epoch * config.epochs
    started = time.perf_counter() - state["seconds"]
    try:
        for epoch in range(state["epoch"], config.epochs):
            batches = _batches(train_data, config.batch_size, config.seed, epoch)
            for b in range(state["batch"] if epoch == state["epoch"] else 0, len(batches)):
                model.train()
                loss, n = batch_loss(model, batches[b], pad)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                state.update(epoch=epoch, batch=b + 1, step=state["step"] + 1)
                state["tokens"] += sum(len(t.input_ids) for t in batches[b])
                state["seconds"] = time.perf_counter() - started
                state["history"].append(loss.item())
                if on_step:
                    tps = state["tokens"] / max(state["seconds"], 1e-9)
                    on_step(Progress(state["step"], total, state["history"][-1], tps))
                if state["step"] % config.checkpoint_every == 0:
                    save_checkpoint(model, optimizer, state, ckpt)
            state.update(epoch=epoch + 1, batch=0)
    except KeyboardInterrupt:
        save_checkpoint(model, optimizer, state, ckpt)
        raise Interrupted(
            f"interrupted at step {state['step']} of {total}; a checkpoint is in {ckpt}: "
            "run the same command with --resume to continue"
        ) from None
    save_checkpoint(model, optimizer, state, ckpt)
    val_after = evaluate_loss(model, val_data, pad, config.batch_size)
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    result = TuneResult(
        adapter_dir=adapter_dir,
        steps=state["step"],
        train_tokens=state["tokens"],
        seconds=state["seconds"],
        tokens_per_s=state["tokens"] / max(state["seconds"], 1e-9),
        val_loss_before=val_before,
        val_loss_after=val_after,
        peak_rss_bytes=_peak_rss(),
        config=config,
        history=state["history"],
    )
    return result, model, tokenizer, val_data


# -- what the tuning changed -----------------------------------------------------------------


def kl_from_base(model: Any, tokenizer: Any, text: str, ctx: int = 256, chunks: int = 4) -> float:
    """Mean KL(base || tuned) per token on `text`, with the adapter switched off for the base."""
    import torch
    import torch.nn.functional as F

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for k in range(min(chunks, len(ids) // ctx)):
            x = torch.tensor([ids[k * ctx : (k + 1) * ctx]])
            tuned = F.log_softmax(model(input_ids=x).logits[0].double(), -1)
            with model.disable_adapter():
                base = F.log_softmax(model(input_ids=x).logits[0].double(), -1)
            kl = (base.exp() * (base - tuned)).sum(-1)
            total += float(kl.sum())
            count += kl.numel()
    return total / max(count, 1)


def generate(model: Any, tokenizer: Any, template: ChatTemplate, messages: list, n: int) -> str:
    import torch

    prompt = template.render(messages, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def side_by_side(
    model: Any, tokenizer: Any, template: ChatTemplate, examples: list[Example], n_tokens: int = 48
) -> list[dict[str, str]]:
    """Held-out prompts answered by the base (adapter off) and the tuned model."""
    rows = []
    model.eval()
    for ex in examples:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompt = ex.messages[:last]
        with model.disable_adapter():
            base = generate(model, tokenizer, template, prompt, n_tokens)
        tuned = generate(model, tokenizer, template, prompt, n_tokens)
        rows.append(
            {
                "prompt": prompt[-1]["content"],
                "expected": ex.messages[last]["content"],
                "base": base,
                "tuned": tuned,
            }
        )
    return rows
