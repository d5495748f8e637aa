"""The final model as one Hugging Face checkpoint folder (safetensors + config + tokenizer), or
for LoRA the adapter checkpoint (`arenaflow.train.lora`), gathered the same way.

Under FSDP every rank holds a shard; `get_model_state_dict(full_state_dict=True, cpu_offload=True)`
all-gathers parameter by parameter and keeps the full tensors on rank 0 only, so no rank holds a
second full copy besides the one being written.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def full_state_dict(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0 (empty on other ranks when sharded)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_full_checkpoint(
    model: torch.nn.Module, tokenizer: Any, out_dir: Path, trainer: Any
) -> None:
    """Gather and write `model.safetensors`, `config.json`, the generation config and the tokenizer."""
    from safetensors.torch import save_file

    sharded = trainer.world_size > 1
    state = full_state_dict(model, sharded)
    if trainer.global_rank == 0:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = model.config
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # transformers re-ties it on load
        state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.use_cache = True
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        log.info("full checkpoint written to %s (%d tensors)", out_dir, len(state))
    del state
    trainer.strategy.barrier("save_full_checkpoint")


def save_adapter_checkpoint(
    model: torch.nn.Module, tokenizer: Any, out_dir: Path, trainer: Any, base: dict[str, str] | None
) -> None:
    """Gather the adapter weights (the trainable parameters) and write the adapter checkpoint."""
    from arenaflow.train.lora import save_adapter

    state = full_state_dict(model, trainer.world_size > 1)
    if trainer.global_rank == 0:
        assert base is not None, "rank 0 resolves the base reference before training"
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        save_adapter(
            model, {k: v for k, v in state.items() if k in names}, tokenizer, out_dir, base
        )
    del state
    trainer.strategy.barrier("save_adapter_checkpoint")


def adapter_fsdp_strategy(**kwargs: Any) -> Any:
    """Lightning's FSDP2 strategy whose distributed checkpoints hold only the trainable
    parameters (LoRA's adapters) and their optimizer state, as on one device.

    Saving needs nothing of its own: the module's `on_save_checkpoint` drops the frozen base from
    the state dict before it is written. Loading does: Lightning asks the checkpoint for the
    module's whole state dict, so here only the trainable entries are asked for and set; the
    frozen base comes from `model_path` again, as on one device."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class AdapterModelParallelStrategy(ModelParallelStrategy):
        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
            from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint

            path = Path(self.broadcast(checkpoint_path))
            if not _is_sharded_checkpoint(path):
                return super().load_checkpoint(checkpoint_path, weights_only)
            return _load_adapter_checkpoint(self, path, weights_only)

    return AdapterModelParallelStrategy(**kwargs)


def _load_adapter_checkpoint(strategy: Any, path: Path, weights_only: bool | None) -> Any:
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    module = strategy.model
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    state = {k: v for k, v in get_model_state_dict(module).items() if k in trainable}
    try:
        dcp.load({"state_dict": state}, checkpoint_id=path)
    except Exception as e:  # a checkpoint of another configuration (a full run, other targets)
        raise ValueError(
            f"{path} does not hold this LoRA configuration's adapter weights ({e}); set "
            "train.resume=false to start over"
        ) from e
    set_model_state_dict(module, state, options=StateDictOptions(strict=False))
    for i, optimizer in enumerate(strategy.optimizers):
        optim = {f"optimizer_{i}": get_optimizer_state_dict(module, optimizer)}
        dcp.load(optim, checkpoint_id=path)
        set_optimizer_state_dict(
            module,
            optimizer,
            optim_state_dict=optim[f"optimizer_{i}"],
            options=StateDictOptions(cpu_offload=True),
        )
    return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
