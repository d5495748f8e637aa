"""LoRA adapter checkpoints for tests, made with peft directly on the tiny Llama with random A
and B (peft's `init_lora_weights=False`; B is zero by default), so each one changes the greedy
tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from arenaflow.adapters import ADAPTER_META
from arenaflow.models import load_model, load_tokenizer, model_identity

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, base_ref: str | None = None) -> Path:
    """A LoRA adapter checkpoint as training saves it: peft's files, the tokenizer, arenaflow_adapter.json."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(load_model(base), config)
    model.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)
    ref = base_ref or str(base)
    meta = {"base": ref, "base_digest": model_identity(str(base), None) if not base_ref else None}
    (out / ADAPTER_META).write_text(json.dumps(meta))
    return out


def models_override(base: Path, adapters: dict[str, Path]) -> str:
    """The `serve.models` override serving `base` as tiny-base and each adapter under its name."""
    entries = [f"{{name: tiny-base, uri: {base}}}"]
    entries += [f"{{name: {n}, uri: {p}}}" for n, p in adapters.items()]
    return f"serve.models=[{', '.join(entries)}]"
