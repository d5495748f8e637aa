"""The training recipe for one process (rank): setup -> fit (resuming) -> gather -> register.

`plan(cfg)` does everything that needs no process group (resolve the base model, the data hash,
the output folder, the accumulation, the memory preflight); `fit(cfg, plan)` is what each rank
runs, whether one process trains alone or torchrun / SLURM started several; rank 0 hands what it
trained to `results.finish`, which registers the model and writes result.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from arenaflow import io
from arenaflow.config import config_hash
from arenaflow.models import chat_template_hash, load_tokenizer, resolve_model
from arenaflow.tracking import Tracker, git_commit, tracker_from_cfg
from arenaflow.train.allocator import retain_enabled, retained_heap
from arenaflow.train.flops import ModelShape, model_shape, peak_flops
from arenaflow.train.lora import (
    LoraSettings,
    base_reference,
    check_supported,
    trainable_parameters,
)
from arenaflow.train.preflight import check_accelerator, check_memory
from arenaflow.train.results import FitOutcome, finish

if TYPE_CHECKING:
    import lightning as L

    from arenaflow.train.data import SFTDataModule
    from arenaflow.train.module import ChatLM

log = logging.getLogger(__name__)


@dataclass
class TrainPlan:
    """Everything decided before any rank starts."""

    model_path: str
    data_dir: str
    data_hash: str
    out_dir: str
    world_size: int
    micro_batch_size: int
    accumulate: int
    max_steps: int
    shape: dict[str, int]
    memory: dict[str, float] = field(default_factory=dict)
    compile: bool = False
    trainable_params: int | None = None  # LoRA: the adapters' parameters; None: all train

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def data_dir(cfg: DictConfig) -> str:
    return cfg.train.data_uri or io.artifact_uri(cfg, "data", "sft_dataset")


def dataset_hash(path: str) -> str:
    """A content hash of a saved DatasetDict: the fingerprints `datasets` records per split."""
    root = Path(path)
    if not (root / "dataset_dict.json").exists():
        raise FileNotFoundError(
            f"{path} is not a saved DatasetDict (no dataset_dict.json); materialize sft_dataset "
            "(python -m arenaflow.data) or set train.data_uri"
        )
    h = hashlib.sha256()
    for state in sorted(root.glob("*/state.json")):
        h.update(state.parent.name.encode())
        h.update(str(json.loads(state.read_text()).get("_fingerprint")).encode())
    return h.hexdigest()[:16]


def world_size(cfg: DictConfig) -> int:
    return int(cfg.hardware.devices) * int(cfg.hardware.num_nodes)


def batch_layout(cfg: DictConfig) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) that keep `train.global_batch_size` on any target.

    A global batch smaller than one micro-batch per rank shrinks the micro-batch instead.
    """
    world = world_size(cfg)
    micro = int(cfg.hardware.micro_batch_size)
    gbs = int(cfg.train.global_batch_size)
    if gbs < micro * world and gbs % world == 0:
        log.info(
            "global batch %d < %d ranks x micro-batch %d: micro-batch %d",
            gbs,
            world,
            micro,
            gbs // world,
        )
        micro = gbs // world
    if gbs % (micro * world):
        raise ValueError(
            f"train.global_batch_size={gbs} is not a multiple of hardware.micro_batch_size "
            f"({micro}) x devices x num_nodes ({world}) = {micro * world}; change one of them"
        )
    return micro, gbs // (micro * world)


def accumulation(cfg: DictConfig) -> int:
    """Gradient accumulation steps per optimizer step."""
    return batch_layout(cfg)[1]


def run_key(cfg: DictConfig, data_hash: str) -> str:
    """Same model, recipe, data and parallel layout -> same folder, so a rerun resumes."""
    ident = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "train": {
            k: v
            for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
            if k not in ("register", "resume", "preflight", "data_uri", "data_hash")
        },
        "data_hash": data_hash,
        "strategy": cfg.hardware.strategy,
        "world_size": world_size(cfg),
        "seed": cfg.seed,
    }
    return f"{cfg.model.name}-{config_hash(ident)}"


def output_dir(cfg: DictConfig, data_hash: str | None = None) -> Path:
    """Local folder of a run: checkpoints/, final/, metrics.jsonl, result.json."""
    data_hash = data_hash or cfg.train.data_hash or dataset_hash(data_dir(cfg))
    root = io.local_path(io.artifact_uri(cfg, "models", "finetuned"))
    if root is None:  # remote artifact store: train locally, upload the final model
        root = Path(cfg.paths.home) / "models" / "finetuned"
    return root / run_key(cfg, data_hash)


def plan(cfg: DictConfig) -> TrainPlan:
    check_accelerator(cfg.hardware)
    lora = LoraSettings.from_cfg(cfg.train.lora)
    check_supported(lora, cfg.hardware)
    compiled = compile_enabled(cfg.train.compile, str(cfg.hardware.accelerator))
    model_path = resolve_model(cfg.model, cfg.paths.cache_dir)
    ddir = data_dir(cfg)
    local = io.download_dir(ddir, Path(cfg.paths.cache_dir) / "sft_dataset")
    dhash = cfg.train.data_hash or dataset_hash(str(local))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    shape = model_shape(config)
    trainable = trainable_parameters(config, lora) if lora else None
    memory = {}
    if cfg.train.preflight:
        memory = check_memory(
            shape,
            cfg.hardware,
            int(cfg.train.max_length),
            cfg.model.name,
            trainable=trainable,
            quantized=bool(lora and lora.quantize),
        ).as_dict()
    return TrainPlan(
        model_path=str(model_path),
        data_dir=str(local),
        data_hash=dhash,
        out_dir=str(output_dir(cfg, dhash)),
        world_size=world_size(cfg),
        micro_batch_size=batch_layout(cfg)[0],
        accumulate=batch_layout(cfg)[1],
        max_steps=int(cfg.train.max_steps),
        shape=asdict(shape),
        memory=memory,
        compile=compiled,
        trainable_params=trainable,
    )


def _strategy(cfg: DictConfig) -> Any:
    hw = cfg.hardware
    if hw.strategy == "single":
        return "auto"
    if hw.strategy != "fsdp":
        raise ValueError(f"hardware.strategy={hw.strategy!r} is not one of single, fsdp")
    from lightning.pytorch.strategies import ModelParallelStrategy

    from arenaflow.train.checkpoint import adapter_fsdp_strategy

    options = {
        "data_parallel_size": world_size(cfg),
        "tensor_parallel_size": 1,
        "save_distributed_checkpoint": True,
        "process_group_backend": hw.process_group_backend,
    }
    if LoraSettings.from_cfg(cfg.train.lora) is not None:  # checkpoints of the adapters only
        return adapter_fsdp_strategy(**options)
    return ModelParallelStrategy(**options)


def build_datamodule(
    train: DictConfig, hardware: DictConfig, p: TrainPlan, pad_id: int, seed: int
) -> SFTDataModule:
    """The SFT data module of `train` (lengths, packing, grouping) at the plan's micro-batch."""
    from arenaflow.train.data import SFTDataModule

    return SFTDataModule(
        p.data_dir,
        pad_id=pad_id,
        micro_batch_size=p.micro_batch_size,
        max_length=int(train.max_length),
        packing=bool(train.packing),
        group_by_length=bool(train.group_by_length),
        pad_to_multiple_of=int(train.pad_to_multiple_of),
        seed=seed,
        num_workers=int(hardware.num_workers),
    )


def build_module(cfg: DictConfig, p: TrainPlan) -> ChatLM:
    """The LightningModule: the base model, `train.optimizer` (a `_partial_` target) and schedule."""
    import hydra.utils

    from arenaflow.train.module import ChatLM

    tr, hw = cfg.train, cfg.hardware
    return ChatLM(
        p.model_path,
        hydra.utils.instantiate(tr.optimizer),
        warmup_ratio=float(tr.warmup_ratio),
        lr_scheduler=str(tr.lr_scheduler),
        grad_clip=tr.grad_clip,
        strategy=str(hw.strategy),
        activation_checkpointing=bool(hw.activation_checkpointing),
        compile=p.compile,
        trust_remote_code=bool(cfg.model.trust_remote_code),
        lora=LoraSettings.from_cfg(tr.lora),
        precision=str(hw.precision),
    )


def build_trainer(cfg: DictConfig, p: TrainPlan, has_val: bool, callbacks: list[Any]) -> L.Trainer:
    """Lightning's Trainer for the hardware target; validation only when the data has a split."""
    import lightning as L

    hw, tr = cfg.hardware, cfg.train
    return L.Trainer(
        accelerator=hw.accelerator,
        devices=int(hw.devices),
        num_nodes=int(hw.num_nodes),
        strategy=_strategy(cfg),
        precision=hw.precision,
        max_steps=p.max_steps,
        max_epochs=-1 if p.max_steps > 0 else int(tr.epochs),
        accumulate_grad_batches=p.accumulate,
        val_check_interval=int(tr.val_check_every_n_steps) * p.accumulate if has_val else None,
        check_val_every_n_epoch=None if has_val else 1,
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=p.out_dir,
    )


def fit(cfg: DictConfig, p: TrainPlan, sink: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on this rank; rank 0 tracks, saves the gathered model, registers it, writes result.json."""
    import lightning as L

    from arenaflow.train.callbacks import PeriodicCheckpoint, StepMetrics, latest_checkpoint

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    hw, tr = cfg.hardware, cfg.train
    out = Path(p.out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(p.model_path, cfg.model)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    tracker = tracker_from_cfg(cfg) if rank == 0 else Tracker()
    peak, peak_source = peak_flops(hw, cfg.paths.cache_dir)
    # ranks on one CPU share its cores; GPUs each bring their own peak
    peak_total = peak if hw.accelerator == "cpu" else peak * p.world_size
    dm = build_datamodule(tr, hw, p, tokenizer.pad_token_id, int(cfg.seed))
    dm.setup("fit")
    module = build_module(cfg, p)
    resume = latest_checkpoint(ckpt_dir) if tr.resume else None
    if rank == 0 and resume is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    has_val = bool(dm.datasets.get("validation") and dm.datasets["validation"].rows)
    tags = {
        "base_model": cfg.model.name,
        "data_hash": p.data_hash,
        "chat_template_hash": chat_template_hash(tokenizer),
        "git_commit": git_commit() or "unknown",
    }
    # CPU: keep freed blocks in the heap, so steps stop re-faulting their large buffers
    retain = retain_enabled(hw.retain_freed_memory, str(hw.accelerator))
    base = base_reference(cfg, p.model_path) if module.lora and rank == 0 else None
    with tracker.start_run("train", cfg, tags=tags) as run, retained_heap(retain) as retained:
        metrics = StepMetrics(
            run,
            ModelShape(**p.shape),
            peak_total,
            out / "metrics.jsonl",
            int(tr.log_every_n_steps),
            sink,
            frozen_weights=module.lora is not None,
        )
        checkpoints = PeriodicCheckpoint(
            ckpt_dir, int(tr.checkpoint_every_n_steps), int(tr.keep_checkpoints)
        )
        trainer = build_trainer(cfg, p, has_val, [metrics, checkpoints])
        if resume is not None:
            log.info("resuming from %s", resume)
            if sink:
                sink(f"resuming from checkpoint {resume.name}")
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
        outcome = FitOutcome(
            run=run,
            metrics=metrics,
            trainer=trainer,
            final_dir=out / "final",
            tags=tags,
            train_time_s=time.perf_counter() - t0,
            peak=peak,
            peak_source=peak_source,
            data_counts=dm.counts,
            resumed_from=resume,
            retained_heap=retained,
        )
        outcome.adapter_dir = save_final(module, tokenizer, out, trainer, base)
        result = finish(cfg, p, tracker, outcome) if trainer.global_rank == 0 else {}
        result = trainer.strategy.broadcast(result, src=0)
    return result


def save_final(
    module: ChatLM, tokenizer: Any, out: Path, trainer: L.Trainer, base: dict[str, str] | None
) -> Path | None:
    """`out/final`: the full checkpoint, or (LoRA) the adapter, or with `train.lora.merge` the
    merged checkpoint with the adapter in `out/adapter`. Returns the adapter's folder."""
    from arenaflow.train.checkpoint import save_adapter_checkpoint, save_full_checkpoint

    if module.lora is None:
        save_full_checkpoint(module.model, tokenizer, out / "final", trainer)
        return None
    adapter_dir = out / ("adapter" if module.lora.merge else "final")
    save_adapter_checkpoint(module.model, tokenizer, adapter_dir, trainer, base)
    if module.lora.merge:
        if trainer.global_rank == 0:
            from arenaflow.train.lora import merge_adapter

            merge_adapter(adapter_dir, module.model_path, out / "final", module.trust_remote_code)
        trainer.strategy.barrier("merge_adapter")
    return adapter_dir


def compile_enabled(setting: Any, accelerator: str) -> bool:
    """`train.compile`: true, false, or auto (on GPUs only: on CPU it measured no faster).

    Inductor needs a C++ compiler on CPU; without one this logs why and trains eager.
    """
    if isinstance(setting, str) and setting.lower() == "auto":
        setting = accelerator == "gpu"
    if not isinstance(setting, bool):
        raise ValueError(f"train.compile must be true, false or auto, not {setting!r}")
    if setting and accelerator == "cpu":
        import shutil

        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            log.warning("train.compile: no C++ compiler on PATH (inductor needs one on CPU); eager")
            return False
    return setting
