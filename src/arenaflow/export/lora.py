"""A LoRA adapter folder (peft's files) as a GGUF LoRA file, which llama.cpp applies over the GGUF of
its base: one copy of the base weights in memory for any number of adapters.

llama.cpp's adapter format: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
and for each adapted matrix its GGUF name with `.lora_a` (A, [r, in]) and `.lora_b` (B, [out, r]).
llama.cpp adds (alpha / r) x B A to the matrix, r read from each B, as peft does for plain LoRA.
B's rows of the q/k projections are reordered to the base file's interleaved rope order, as
`write_gguf` reorders the base's own q/k rows. What llama.cpp cannot apply (DoRA, whole trained
modules, embedding adapters, per-module alphas) is a ValueError naming it: such an adapter is
served merged, or on the hf engine.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from arenaflow.adapters import PEFT_CONFIG
from arenaflow.export.gguf import llama_gguf_writer, rope_interleave

log = logging.getLogger(__name__)

LORA_GGUF = "lora-f32.gguf"
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


def lora_scale(peft_config: dict[str, Any]) -> float:
    """peft's scale of B A: lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); ValueError for what
    llama.cpp's one alpha per file cannot express."""
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"a {peft_config.get('peft_type')} adapter is not LoRA")
    for key, what in (
        ("use_dora", "DoRA"),
        ("modules_to_save", "whole trained modules (modules_to_save)"),
        ("alpha_pattern", "per-module alphas"),
    ):
        if peft_config.get(key):
            raise ValueError(f"llama.cpp applies plain LoRA; this adapter has {what}")
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    if peft_config.get("use_rslora"):
        if peft_config.get("rank_pattern"):
            raise ValueError("llama.cpp cannot scale rsLoRA with per-module ranks")
        return alpha / math.sqrt(r)
    return alpha / r


def write_lora_gguf(adapter: str | Path, base_config: Any, out: str | Path) -> Path:
    """Write the LoRA adapter folder `adapter` (over a Llama base whose transformers config is
    `base_config`) to the GGUF LoRA file `out`; it appears under its name only once complete."""
    import gguf
    from safetensors.numpy import load_file

    folder, out = Path(adapter), Path(out)
    peft_config = json.loads((folder / PEFT_CONFIG).read_text())
    scale = lora_scale(peft_config)
    if base_config.model_type != "llama":
        raise ValueError(
            f"GGUF LoRA export takes Llama bases; this one is {base_config.model_type}"
        )
    n_head = int(base_config.num_attention_heads)
    n_kv = int(getattr(base_config, "num_key_value_heads", None) or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(base_config.num_hidden_layers))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    tensors = {}
    for key in sorted(weights):
        m = _KEY.fullmatch(key)
        name = m and names.get_name(m["module"] + ".weight", try_suffixes=(".weight",))
        if not name:
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A/B of a Llama projection")
        data = weights[key].astype(np.float32)
        if m["ab"] == "B" and m["module"].endswith(("q_proj", "k_proj")):
            data = rope_interleave(data, n_head if m["module"].endswith("q_proj") else n_kv)
        tensors[f"{name}.lora_{m['ab'].lower()}"] = np.ascontiguousarray(data)
    if not tensors:
        raise ValueError(f"{folder} holds no LoRA weights")
    # llama.cpp's scale is alpha / r with r read from each B: the alpha that gives peft's scale
    alpha = scale * int(peft_config["r"])
    with llama_gguf_writer(out) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string("arenaflow.source_adapter", str(folder))
        for name, data in tensors.items():
            writer.add_tensor(name, data)
    log.info("wrote %s (%d LoRA tensors, scale %g)", out, len(tensors), scale)
    return out
