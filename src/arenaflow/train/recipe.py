"""The training recipe for one process (rank): setup -> fit (resuming) -> gather -> register.

`plan(cfg)` does everything that needs no process group (resolve the base model, the data hash,
the output folder, the accumulation, the memory preflight); `fit(cfg, plan)` is what each rank
runs, whether one process trains alone or torchrun / SLURM started several.
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
from typing import Any

from omegaconf import DictConfig, OmegaConf

from arenaflow import io
from arenaflow.config import config_hash
from arenaflow.models import chat_template_hash, load_tokenizer, resolve_model
from arenaflow.tracking import Tracker, git_commit, tracker_from_cfg
from arenaflow.train.allocator import retain_enabled, retained_heap
from arenaflow.train.flops import ModelShape, best_cpu_peak_flops, model_shape, peak_flops
from arenaflow.train.preflight import check_accelerator, check_memory

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def data_dir(cfg: DictConfig) -> str:
    return cfg.train.get("data_uri") or io.artifact_uri(cfg, "data", "sft_dataset")


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
    data_hash = data_hash or cfg.train.get("data_hash") or dataset_hash(data_dir(cfg))
    root = io.local_path(io.artifact_uri(cfg, "models", "finetuned"))
    if root is None:  # remote artifact store: train locally, upload the final model
        root = Path(cfg.paths.home) / "models" / "finetuned"
    return root / run_key(cfg, data_hash)


def plan(cfg: DictConfig) -> TrainPlan:
    check_accelerator(cfg.hardware)
    compiled = compile_enabled(cfg.train.get("compile", False), str(cfg.hardware.accelerator))
    model_path = resolve_model(cfg.model, cfg.paths.cache_dir)
    ddir = data_dir(cfg)
    local = io.download_dir(ddir, Path(cfg.paths.cache_dir) / "sft_dataset")
    dhash = cfg.train.get("data_hash") or dataset_hash(str(local))
    from transformers import AutoConfig

    shape = model_shape(
        AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    )
    memory = {}
    if cfg.train.get("preflight", True):
        memory = check_memory(
            shape, cfg.hardware, int(cfg.train.max_length), cfg.model.name
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
    )


def _strategy(cfg: DictConfig) -> Any:
    hw = cfg.hardware
    if hw.strategy == "single":
        return "auto"
    if hw.strategy != "fsdp":
        raise ValueError(f"hardware.strategy={hw.strategy!r} is not one of single, fsdp")
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(
        data_parallel_size=world_size(cfg),
        tensor_parallel_size=1,
        save_distributed_checkpoint=True,
        process_group_backend=hw.get("process_group_backend"),
    )


def fit(cfg: DictConfig, p: TrainPlan, sink: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on this rank; rank 0 tracks, saves the gathered model, registers it, writes result.json."""
    import hydra.utils
    import lightning as L

    from arenaflow.train.callbacks import PeriodicCheckpoint, StepMetrics, latest_checkpoint
    from arenaflow.train.checkpoint import save_full_checkpoint
    from arenaflow.train.data import SFTDataModule
    from arenaflow.train.module import ChatLM

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = Path(p.out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(p.model_path, cfg.model)
    template_hash = chat_template_hash(tokenizer)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    tracker = tracker_from_cfg(cfg) if rank == 0 else Tracker()
    shape = ModelShape(**p.shape)
    peak, peak_source = peak_flops(cfg.hardware, cfg.paths.cache_dir)
    # ranks on one CPU share its cores; GPUs each bring their own peak
    peak_total = peak if cfg.hardware.accelerator == "cpu" else peak * p.world_size

    hw, tr = cfg.hardware, cfg.train
    dm = SFTDataModule(
        p.data_dir,
        pad_id=tokenizer.pad_token_id,
        micro_batch_size=p.micro_batch_size,
        max_length=int(tr.max_length),
        packing=bool(tr.packing),
        group_by_length=bool(tr.get("group_by_length", True)),
        pad_to_multiple_of=int(tr.get("pad_to_multiple_of", 1)),
        seed=int(cfg.seed),
        num_workers=int(hw.num_workers),
    )
    dm.setup("fit")
    module = ChatLM(
        p.model_path,
        hydra.utils.instantiate(tr.optimizer),
        warmup_ratio=float(tr.warmup_ratio),
        lr_scheduler=str(tr.lr_scheduler),
        grad_clip=tr.get("grad_clip"),
        strategy=str(hw.strategy),
        activation_checkpointing=bool(hw.activation_checkpointing),
        compile=p.compile,
        trust_remote_code=bool(cfg.model.trust_remote_code),
    )
    resume = latest_checkpoint(ckpt_dir) if tr.get("resume", True) else None
    if rank == 0 and resume is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    has_val = bool(dm.datasets.get("validation") and dm.datasets["validation"].rows)
    tags = {
        "base_model": cfg.model.name,
        "data_hash": p.data_hash,
        "chat_template_hash": template_hash,
        "git_commit": git_commit() or "unknown",
    }
    # CPU: keep freed blocks in the heap, so steps stop re-faulting their large buffers
    retain = retain_enabled(hw.get("retain_freed_memory", True), str(hw.accelerator))
    with tracker.start_run("train", cfg, tags=tags) as run, retained_heap(retain) as retained:
        metrics_cb = StepMetrics(
            run, shape, peak_total, out / "metrics.jsonl", int(tr.log_every_n_steps), sink
        )
        trainer = L.Trainer(
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
            callbacks=[
                metrics_cb,
                PeriodicCheckpoint(
                    ckpt_dir, int(tr.checkpoint_every_n_steps), int(tr.get("keep_checkpoints", 2))
                ),
            ],
            default_root_dir=str(out),
        )
        if resume is not None:
            log.info("resuming from %s", resume)
            if sink:
                sink(f"resuming from checkpoint {resume.name}")
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
        train_time = time.perf_counter() - t0
        final_dir = out / "final"
        save_full_checkpoint(module.model, tokenizer, final_dir, trainer)
        result: dict[str, Any] = {}
        if trainer.global_rank == 0:
            result = _finish(
                cfg,
                p,
                run,
                tracker,
                metrics_cb,
                trainer,
                final_dir,
                tags,
                train_time,
                peak,
                peak_source,
                dm.counts,
                resume,
                retained,
            )
        result = trainer.strategy.broadcast(result, src=0)
    return result


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


def _summary(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """Throughput over the run; the first step (warm-up, data loading start) is left out when possible."""
    rows = history[1:] if len(history) > 2 else history
    if not rows:
        return {"tokens_per_s": None, "trained_tokens_per_s": None, "mfu": None}
    dt = sum(r["step_time_s"] for r in rows)
    mfu = sum(r["mfu"] * r["step_time_s"] for r in rows) / dt
    return {
        "tokens_per_s": sum(r["input_tokens"] for r in rows) / dt,
        "trained_tokens_per_s": sum(r["trained_tokens"] for r in rows) / dt,
        "mfu": mfu,
    }


def read_history(out_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl across resumes; a step replayed after a kill keeps its latest record."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _finish(
    cfg: DictConfig,
    p: TrainPlan,
    run: Any,
    tracker: Tracker,
    metrics_cb: Any,
    trainer: Any,
    final_dir: Path,
    tags: dict[str, str],
    train_time: float,
    peak: float,
    peak_source: str,
    counts: dict[str, Any],
    resume: Path | None,
    retained_heap: bool,
) -> dict[str, Any]:
    history = read_history(Path(p.out_dir))
    summary = _summary(metrics_cb.history)
    if peak_source == "cpu_fp32_matmul_probe":
        # A start probe taken while other work shared the cores reads low; probe again now and
        # rate the run against the better of the two (the step logs keep the start peak).
        end_peak = best_cpu_peak_flops(cfg.paths.cache_dir)
        if end_peak > peak:
            if summary["mfu"] is not None:
                summary["mfu"] *= peak / end_peak
            peak = end_peak
    run.log_metrics({f"summary_{k}": v for k, v in summary.items() if v is not None})
    run.log_dict({"plan": p.to_json(), "data_counts": counts}, "train_plan.json")
    version = None
    model_uri = None
    name = cfg.tracking.registered_model_name
    if cfg.train.get("register", True):
        info = tracker.register_model(run, final_dir, name, tags=tags)
        if info is not None:
            version = info.version
            model_uri = f"models:/{name}/{version}"
    uploaded = io.upload_dir(
        final_dir, io.artifact_uri(cfg, "models", "finetuned", Path(p.out_dir).name, "final")
    )
    val = metrics_cb.val_history[-1]["val_loss"] if metrics_cb.val_history else None
    result = {
        "path": str(final_dir),
        "uri": uploaded,
        "model_uri": model_uri,
        "version": version,
        "registered_name": name if version else None,
        "run_id": run.run_id,
        "run_url": run.url,
        "final_loss": history[-1]["loss"] if history else None,
        "val_loss": val,
        "steps": int(trainer.global_step),
        "resumed_from": resume.name if resume else None,
        "chat_template_hash": tags["chat_template_hash"],
        "data_hash": p.data_hash,
        "base_model": cfg.model.name,
        "train_time_s": train_time,
        "peak_tflops": peak / 1e12,
        "peak_source": peak_source,
        "world_size": p.world_size,
        "micro_batch_size": p.micro_batch_size,
        "accumulate": p.accumulate,
        "n_params": p.shape["n_params"],
        "memory_estimate_gb": p.memory,
        "data_counts": counts,
        "sharding": trainer.lightning_module.sharding,
        "compiled": trainer.lightning_module.compiled,
        "retained_heap": retained_heap,
        "history": history,
        "val_history": metrics_cb.val_history,
        **summary,
    }
    io.write_json(str(Path(p.out_dir) / "result.json"), result)
    log.info(
        "trained %d steps; final loss %s; model %s",
        result["steps"],
        result["final_loss"],
        model_uri or final_dir,
    )
    return result
