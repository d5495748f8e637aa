"""Lightning callbacks of the recipe: per-step metrics (loss, lr, grad norm, tokens/s, MFU) and
periodic checkpoints with a `LATEST` pointer that resume reads.

The checkpoint folder holds only complete `step-*.ckpt` entries: a save is written under a hidden
`.step-*.partial` name and renamed once every rank has written, and only then does `LATEST` move.
What a killed save leaves is removed when the next run starts, and rotation never removes what
`LATEST` names, so a resume always finds it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from arenaflow.tracking import Run
from arenaflow.train.flops import ModelShape, train_flops

log = logging.getLogger(__name__)

LATEST = "LATEST"
_STEP = re.compile(r"^step-(\d+)\.ckpt$")


class StepMetrics(L.Callback):
    """Aggregates each optimizer step over micro-batches and ranks; rank 0 records it."""

    def __init__(
        self,
        run: Run,
        shape: ModelShape,
        peak_flops_total: float,
        history_path: Path,
        log_every: int = 1,
        sink: Callable[[str], None] | None = None,
        frozen_weights: bool = False,
    ) -> None:
        self.run = run
        self.frozen_weights = frozen_weights  # LoRA: MFU counts no weight gradients of the base
        self.shape = shape
        self.peak = peak_flops_total
        self.history_path = history_path
        self.log_every = max(1, log_every)
        self.sink = sink
        self.last_step = 0
        self.history: list[dict[str, float]] = []
        self.val_history: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.last_step = trainer.global_step
        pl_module.reset_counters()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.last_step:
            return  # still accumulating gradients
        self.last_step = trainer.global_step
        dt = time.perf_counter() - pl_module.step_started
        t = torch.tensor(
            [
                pl_module.step_loss_sum,
                pl_module.step_micro_batches,
                pl_module.step_trained_tokens,
                pl_module.step_input_tokens,
                pl_module.step_attn_sq,
                dt,
            ],
            dtype=torch.float64,
        )
        pl_module.reset_counters()
        t = trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum").cpu().tolist()
        loss_sum, micro, trained, inputs, attn_sq, dt_sum = t
        dt = dt_sum / trainer.world_size
        # the head runs only on labelled positions (module.labelled_loss_sum)
        flops = train_flops(
            self.shape,
            int(inputs),
            int(attn_sq),
            head_tokens=int(trained),
            frozen_weights=self.frozen_weights,
        )
        row = {
            "step": trainer.global_step,
            "loss": loss_sum / max(micro, 1),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "grad_norm": pl_module.last_grad_norm,
            "tokens_per_s": inputs / dt,
            "trained_tokens_per_s": trained / dt,
            "mfu": flops / dt / self.peak,
            "step_time_s": dt,
            "trained_tokens": trained,
            "input_tokens": inputs,
            "attn_sq": attn_sq,
        }
        if trainer.global_rank != 0:
            return
        self.history.append(row)
        self.run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        with open(self.history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if row["step"] % self.log_every == 0 or row["step"] == trainer.max_steps:
            msg = (
                f"step {row['step']}/{trainer.max_steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"grad_norm {row['grad_norm'] or 0:.3f} tok/s {row['tokens_per_s']:.0f} "
                f"trained tok/s {row['trained_tokens_per_s']:.0f} mfu {row['mfu']:.1%}"
            )
            (self.sink or log.info)(msg)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0 or pl_module.last_val_loss is None:
            return
        row = {"step": trainer.global_step, "val_loss": pl_module.last_val_loss}
        self.val_history.append(row)
        self.run.log_metrics({"val_loss": row["val_loss"]}, step=row["step"])
        msg = f"step {row['step']} val_loss {row['val_loss']:.4f}"
        (self.sink or log.info)(msg)


class PeriodicCheckpoint(L.Callback):
    """Every N optimizer steps: save a (sharded, under FSDP) checkpoint, then point LATEST at it."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep: int = 2) -> None:
        self.dirpath = Path(dirpath)
        self.every = every_n_steps
        self.keep = max(1, keep)
        self.last_saved = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.last_saved = trainer.global_step
        if trainer.global_rank == 0:
            prune_checkpoints(self.dirpath, self.keep)
        trainer.strategy.barrier("checkpoints-pruned")  # no rank writes into a folder being removed

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == 0 or step % self.every or step == self.last_saved:
            return
        self.last_saved = step
        path = self.dirpath / f"step-{step:08d}.ckpt"
        partial = self.dirpath / f".{path.name}.partial"
        trainer.save_checkpoint(partial)  # ends with a barrier: every rank has written its shard
        if trainer.global_rank == 0:
            _replace(partial, path)
            tmp = self.dirpath / f".{LATEST}.tmp"
            tmp.write_text(path.name)
            os.replace(tmp, self.dirpath / LATEST)
            prune_checkpoints(self.dirpath, self.keep)
            log.info("checkpoint saved: %s", path)


def _replace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; a folder cannot replace another in one step, so an older `dst`
    (the same step saved by an earlier run) is moved aside first."""
    if dst.exists() and (dst.is_dir() or src.is_dir()):
        aside = dst.with_name(f".{dst.name}.old")
        _remove(aside)
        os.replace(dst, aside)
        os.replace(src, dst)
        _remove(aside)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prune_checkpoints(dirpath: Path, keep: int) -> None:
    """Keep what LATEST names and the `keep - 1` checkpoints before it; remove what a killed save
    left (`.step-*`), older checkpoints, and any of a higher step than LATEST's (a run that was not
    resumed from, or one killed before LATEST moved). Without LATEST, only leftovers go."""
    dirpath = Path(dirpath)
    for leftover in dirpath.glob(".step-*"):
        log.info("removing %s, left by an interrupted save", leftover)
        _remove(leftover)
    pointer = dirpath / LATEST
    if not pointer.exists():
        return
    target = _STEP.match(pointer.read_text().strip())
    if target is None or not (dirpath / target.group(0)).exists():
        return  # nothing sound to keep around; latest_checkpoint explains it
    latest = int(target.group(1))
    steps = {int(m.group(1)): p for p in dirpath.iterdir() if (m := _STEP.match(p.name))}
    kept = sorted(s for s in steps if s <= latest)[-keep:]
    for step, path in steps.items():
        if step not in kept:
            _remove(path)


def latest_checkpoint(dirpath: Path) -> Path | None:
    """The checkpoint LATEST names, or None before the first save.

    LATEST naming a missing checkpoint is an error, not a fresh start: a run that silently starts
    over would throw away its training and overwrite the checkpoints."""
    pointer = Path(dirpath) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = Path(dirpath) / name
    if not path.exists():
        present = sorted(p.name for p in Path(dirpath).glob("step-*.ckpt"))
        raise FileNotFoundError(
            f"{pointer} names {name!r}, which is missing (present: {present or 'none'}); "
            "write one of them into LATEST to resume from it, or set train.resume=false to "
            "start over"
        )
    return path
