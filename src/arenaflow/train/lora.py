"""LoRA and QLoRA fine-tuning (`train=lora`, `train=qlora`): peft adapters on a frozen base.

The recipe is Vicuna's as for full fine-tuning; what changes is which parameters train (peft's
low-rank adapters on the projections named in `train.lora.target_modules`), how the base is held
(QLoRA: 4-bit NF4 via bitsandbytes) and what is saved: an adapter checkpoint, the contract every
loader of arenaflow reads:

    adapter_config.json, adapter_model.safetensors   peft's own `save_pretrained`
    tokenizer files                                    with the chat template the run trained on
    arenaflow_adapter.json                             {"base": <reference>, "base_digest": <identity>}

`base` is the registry version of the base model (`models:/name/N`, registered once by
`train.base.register_base`) when the run registers into a tracked registry, else the base's folder;
`base_digest` is `arenaflow.models.model_identity` of that reference.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

ADAPTER_META = "arenaflow_adapter.json"
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class LoraSettings:
    """`train.lora`: the adapter's shape, the base's quantization, and whether to merge at the end."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    quantize: str | None = None  # None | nf4 | fp4 (QLoRA)
    merge: bool = False

    @classmethod
    def from_cfg(cls, section: DictConfig | None) -> LoraSettings | None:
        """None for full fine-tuning (`train.lora: null`)."""
        if section is None:
            return None
        quantize = section.quantize
        if quantize is not None and quantize not in QUANT_TYPES:
            raise ValueError(
                f"train.lora.quantize={quantize!r} is not one of null, {', '.join(QUANT_TYPES)}"
            )
        if int(section.rank) < 1 or not section.target_modules:
            raise ValueError(
                "train.lora needs rank >= 1 and at least one of target_modules "
                f"(got rank={section.rank}, target_modules={list(section.target_modules or [])})"
            )
        return cls(
            rank=int(section.rank),
            alpha=float(section.alpha),
            dropout=float(section.dropout),
            target_modules=tuple(str(m) for m in section.target_modules),
            quantize=quantize,
            merge=bool(section.merge),
        )

    def peft_config(self) -> Any:
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
        )

    def tags(self) -> dict[str, str]:
        return {
            "lora_rank": str(self.rank),
            "lora_alpha": f"{self.alpha:g}",
            "lora_target_modules": ",".join(self.target_modules),
            "lora_quantize": self.quantize or "none",
        }


def check_supported(lora: LoraSettings | None, hardware: DictConfig) -> None:
    """QLoRA needs bitsandbytes: stop before anything runs. (Under FSDP2 its 4-bit base is held
    whole by every rank, `ChatLM.configure_model`; the adapters shard.)"""
    if lora is None or lora.quantize is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"train.lora.quantize={lora.quantize} (QLoRA) needs bitsandbytes ({e}); install it "
            "(pip install bitsandbytes) or use train=lora"
        ) from e


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a 4-bit base dequantizes to for its matmuls: the training precision's."""
    return torch.bfloat16 if str(precision).startswith("bf16") else torch.float32


def load_base(
    path: str, lora: LoraSettings, precision: str, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The base model with adapters attached: frozen fp32 weights, or 4-bit ones for QLoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if lora.quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=lora.quantize,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(precision),
        )
        # bitsandbytes quantizes when the weights land on their device
        device = torch.get_default_device()
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if lora.quantize:
        # fp32 norms and head; activation checkpointing stays the hardware target's choice
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora.peft_config())


def trainable_parameters(config: Any, lora: LoraSettings) -> int:
    """How many parameters the adapters add (and train), counted on the meta device."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), lora.peft_config())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    out_dir: Path,
    base: dict[str, str],
) -> None:
    """Write the adapter checkpoint (rank 0) from the gathered `state` of the peft model."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    model.save_pretrained(tmp, state_dict=state, save_embedding_layers=False)
    tokenizer.save_pretrained(tmp)
    (tmp / ADAPTER_META).write_text(json.dumps(base, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("adapter written to %s (base %s)", out_dir, base["base"])


def merge_adapter(
    adapter_dir: Path, base_path: str, out_dir: Path, trust_remote_code: bool = False
) -> Path:
    """A full checkpoint of base + adapter (peft `merge_and_unload`), for loaders without LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.config.use_cache = True
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("merged checkpoint written to %s", out_dir)
    return out_dir


def base_reference(cfg: DictConfig, base_path: str) -> dict[str, str]:
    """arenaflow_adapter.json: the base as the registry knows it when the run registers, else its
    folder, with `model_identity` of that reference. Rank 0 only (it may register the base)."""
    from arenaflow.models import model_identity
    from arenaflow.train.base import register_base, resolve_base

    ref = base_path
    tracking_uri = cfg.tracking.get("tracking_uri") if cfg.tracking.enabled else None
    if cfg.train.register and tracking_uri:
        ref = register_base(cfg, resolve_base(cfg))["model_uri"] or base_path
    return {"base": str(ref), "base_digest": model_identity(str(ref), tracking_uri)}
