"""The LightningModule of the Vicuna recipe: assistant-token loss, AdamW + warmup/cosine, FSDP2 wiring.

The Hugging Face model is built in `configure_model` (after the process group exists) and, for
`hardware.strategy=fsdp`, every decoder layer and then the root get `fully_shard` over the
data-parallel mesh: parameters live sharded as DTensors, each layer is all-gathered only while
it runs. The same module runs unsharded on one device for `strategy=single`. With `train.lora`
the model is peft's adapters over the frozen base (`arenaflow.train.lora`); only they train.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F

from arenaflow.data.sft import IGNORE_INDEX

if TYPE_CHECKING:
    from arenaflow.train.lora import LoraSettings

log = logging.getLogger(__name__)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and how many there were."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shift_labels != IGNORE_INDEX).sum()


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """[rows, T] bool: the positions whose next token is labelled (the ones the loss reads)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


_head_rows = threading.local()  # the mask of the forward running on this thread


def _select_head_rows(_module: torch.nn.Module, args: tuple) -> tuple | None:
    mask = getattr(_head_rows, "mask", None)
    return None if mask is None else (args[0][mask], *args[1:])


@contextmanager
def head_only_at(model: torch.nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Run the output head (lm_head) only on the hidden states where `mask` is true.

    A forward pre-hook selects those rows, so the logits come out as [mask.sum(), vocab]: the
    vocabulary projection, its backward and the cross-entropy skip prompt and padding positions.
    The hook sits inside the root's forward, so FSDP2's all-gather of the head still applies, and
    the module tree (and so the checkpoint) is unchanged. It is installed once and reads the mask
    set by this context; outside it, it passes everything through.
    """
    head = model.get_output_embeddings()
    if not getattr(head, "_arenaflow_head_rows", False):
        head.register_forward_pre_hook(_select_head_rows)
        head._arenaflow_head_rows = True
    _head_rows.mask = mask
    try:
        yield
    finally:
        _head_rows.mask = None


def labelled_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_loss_sum` of the model on `batch`, with logits computed only where a label is."""
    labels = batch["labels"]
    mask = labelled_positions(labels)
    with head_only_at(model, mask):
        logits = forward_logits(model, batch)
    targets = labels[:, 1:][mask[:, :-1]]
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total, torch.tensor(targets.numel(), device=labels.device)


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a causal LM on a collated batch.

    Padded rows are padded on the right, so under causal attention no real position can see a
    pad: the 2D padding mask changes nothing the loss reads, and leaving it out lets attention
    take the plain causal path (SDPA `is_causal`, no [rows, 1, T, T] mask to build or apply).
    Pad positions compute throwaway values that nothing reads. Packed rows pass only restarting
    position ids, from which the model builds a block-diagonal causal mask.
    """
    if "packed" in batch:
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        )
    else:
        out = model(input_ids=batch["input_ids"], use_cache=False)
    return out.logits


def compile_layers(model: torch.nn.Module) -> None:
    """`torch.compile` every decoder layer in place (dynamic shapes: one graph for all lengths).

    Per-layer compilation is what FSDP2 composes with (each layer is also its own shard unit),
    and it keeps the module tree and state-dict keys as they are.
    """
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)


def sparse_tied_embedding_grad(model: torch.nn.Module) -> bool:
    """With tied input/output embeddings, let the lookup's gradient be sparse (its rows only).

    The head's gradient of the shared matrix is dense anyway; autograd adds the lookup's sparse
    rows into it in place, so the parameter still ends up with one dense gradient (what fused
    AdamW needs) without a second vocab x hidden buffer to zero-fill and add. Untied models (the
    lookup's would be the parameter's only, sparse, gradient) and FSDP's sharded parameters keep
    the dense default. Returns whether it switched.
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None or head.weight is not embedding.weight or not hasattr(embedding, "sparse"):
        return False
    embedding.sparse = True
    return True


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks to shard one by one (classes named in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"cannot find decoder layers to shard in {type(model).__name__}; "
            "it declares no _no_split_modules"
        )
    return layers


def sharding_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many parameters are DTensor shards, and this rank's share of the elements."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "params": len(params),
        "sharded_params": sum(isinstance(p, DTensor) for p in params),
        "full_numel": sum(p.numel() for p in params),
        "local_numel": sum(
            p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params
        ),
    }


def _is_4bit(param: torch.nn.Parameter) -> bool:
    return type(param).__name__ == "Params4bit"  # bitsandbytes' (imported only for QLoRA)


class ChatLM(L.LightningModule):
    """Causal LM fine-tuning on assistant tokens only."""

    def __init__(
        self,
        model_path: str | Path,
        optimizer: Any,
        *,
        warmup_ratio: float = 0.03,
        lr_scheduler: str = "cosine",
        grad_clip: float | None = 1.0,
        strategy: str = "single",
        activation_checkpointing: bool = False,
        compile: bool = False,
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
        precision: str = "32-true",
    ) -> None:
        super().__init__()
        self.model_path = str(model_path)
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.strategy_name = strategy
        self.activation_checkpointing = activation_checkpointing
        self.compiled = compile
        self.trust_remote_code = trust_remote_code
        self.lora = lora
        self.precision = precision
        self.model: torch.nn.Module | None = None
        self.sharding: dict[str, int] = {}
        self.last_grad_norm: float | None = None
        self.reset_counters()
        self.val_sum = 0.0
        self.val_count = 0
        self.last_val_loss: float | None = None

    def reset_counters(self) -> None:
        """Per-optimizer-step counters read by the metrics callback."""
        self.step_loss_sum = 0.0
        self.step_micro_batches = 0
        self.step_trained_tokens = 0
        self.step_input_tokens = 0
        self.step_attn_sq = 0
        self.step_started = time.perf_counter()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self._load_model()
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode
        if self.activation_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if self.strategy_name != "fsdp" and self.lora is None:  # LoRA: the embedding is frozen
            sparse_tied_embedding_grad(model)
        if self.compiled:  # after activation checkpointing, before sharding
            compile_layers(model)
        if self.strategy_name == "fsdp":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            # QLoRA: bitsandbytes' 4-bit weights (packed codes with their quantization state)
            # are not shardable tensors; FSDP2 leaves them out, so each rank holds the whole
            # frozen 4-bit base and the adapters, norms and embeddings are sharded
            ignored = {p for p in model.parameters() if _is_4bit(p)} or None
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh, ignored_params=ignored)
            fully_shard(model, mesh=mesh, ignored_params=ignored)
        self.model = model
        self.sharding = sharding_summary(model)

    def _load_model(self) -> torch.nn.Module:
        """The model to train: the whole base, or (LoRA) peft adapters on the frozen base."""
        if self.lora is not None:
            from arenaflow.train.lora import load_base

            return load_base(self.model_path, self.lora, self.precision, self.trust_remote_code)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch.float32, trust_remote_code=self.trust_remote_code
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """LoRA: checkpoints hold the adapters only (under FSDP2 too, loaded by
        `checkpoint.adapter_fsdp_strategy`); the frozen base (4-bit for QLoRA, whose quantization
        state cannot be loaded back into a quantized model) comes from `model_path` on resume."""
        if self.lora is not None:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora is None or "state_dict" not in checkpoint:  # FSDP2: the strategy loaded it
            return
        self.strict_loading = False  # the base's weights are not in it
        missing = sorted(
            n
            for n, p in self.named_parameters()
            if p.requires_grad and n not in checkpoint["state_dict"]
        )
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} adapter weights of this run (e.g. "
                f"{missing[0]}): it was not saved by this LoRA configuration; set "
                "train.resume=false to start over"
            )

    def on_train_epoch_start(self) -> None:
        # Lightning hands the epoch to a loader's sampler, never to its batch sampler; ours
        # (data.RankBatchSampler) needs it to draw a new order every epoch
        batch_sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if callable(getattr(batch_sampler, "set_epoch", None)):
            batch_sampler.set_epoch(self.current_epoch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n = labelled_loss_sum(self.model, batch)
        loss = loss_sum / n.clamp(min=1)
        self.step_loss_sum += float(loss.detach())
        self.step_micro_batches += 1
        self.step_trained_tokens += int(n)
        self.step_input_tokens += int(batch["attention_mask"].sum())
        self.step_attn_sq += int(batch["attn_sq"])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        max_norm = self.grad_clip if self.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.last_grad_norm = float(norm)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n = labelled_loss_sum(self.model, batch)
        self.val_sum += float(loss_sum)
        self.val_count += int(n)

    def on_validation_epoch_start(self) -> None:
        self.val_sum, self.val_count = 0.0, 0

    def on_validation_epoch_end(self) -> None:
        t = torch.tensor([self.val_sum, float(self.val_count)], dtype=torch.float64)
        t = self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum").cpu()
        self.last_val_loss = float(t[0] / t[1]) if t[1] > 0 else None

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            self.lr_scheduler,
            optimizer,
            num_warmup_steps=int(round(self.warmup_ratio * total)),
            num_training_steps=total,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
