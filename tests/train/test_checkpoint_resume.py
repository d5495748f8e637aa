"""Periodic checkpoints survive a kill mid-save: the next run resumes from what LATEST names.

A tiny Lightning model drives the real `PeriodicCheckpoint` and resume (`latest_checkpoint`), so
each run takes a second. The kill test runs this file as a script: it trains in a subprocess whose
checkpoint writer (like a sharded or remote one) is not atomic, and is SIGKILLed with a save half
written.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from arenaflow.train.callbacks import LATEST, PeriodicCheckpoint, latest_checkpoint


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.started_at: int | None = None

    def on_train_start(self) -> None:
        self.started_at = self.trainer.global_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1)), 4)


class HalfWrittenAt(TorchCheckpointIO):
    """Writes the checkpoint of `step` half-way, says so, then hangs until killed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if f"step-{self.step:08d}" not in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        print("HALF", flush=True)
        time.sleep(120)


def train(ckpts: Path, max_steps: int, every: int, keep: int = 1, plugins=()) -> Tiny:
    """One run of the recipe's resume logic: resume from LATEST, save every `every` steps."""
    model = Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PeriodicCheckpoint(ckpts, every, keep)],
        plugins=list(plugins),
    )
    resume = latest_checkpoint(ckpts)
    trainer.fit(model, ckpt_path=str(resume) if resume else None)
    return model


def _names(ckpts: Path) -> set[str]:
    return {p.name for p in ckpts.iterdir()}


def test_a_run_killed_mid_save_resumes_from_latest_after_rotation(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    proc = subprocess.Popen(
        [sys.executable, __file__, str(ckpts)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (line := proc.stdout.readline()):
            lines.append(line)
            if line.strip() == "HALF":
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lines and lines[-1].strip() == "HALF", "".join(lines)
    assert (ckpts / LATEST).read_text() == "step-00000002.ckpt"  # step 4 was half written

    # the next run checkpoints every step and keeps one: its save of step 3 must not be rotated
    # away in favour of the half-written step 4
    model = train(ckpts, max_steps=3, every=1, keep=1)
    assert model.started_at == 2
    assert _names(ckpts) == {LATEST, "step-00000003.ckpt"}
    assert (ckpts / LATEST).read_text() == "step-00000003.ckpt"

    # and the run after it resumes from step 3 instead of starting over
    assert train(ckpts, max_steps=4, every=0).started_at == 3


def test_leftovers_of_killed_saves_are_ignored_and_removed(tmp_path: Path) -> None:
    """The states a kill leaves, written by hand: a partial save, a half-written checkpoint of a
    higher step (from a writer that was not atomic), a folder moved aside for a replace."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    train(ckpts, max_steps=2, every=2)
    good = (ckpts / "step-00000002.ckpt").read_bytes()
    (ckpts / ".step-00000004.ckpt.partial").write_bytes(good[:100])
    (ckpts / "step-00000006.ckpt").write_bytes(good[: len(good) // 2])
    (ckpts / ".step-00000002.ckpt.old").mkdir()

    model = train(ckpts, max_steps=4, every=2, keep=1)
    assert model.started_at == 2
    assert _names(ckpts) == {LATEST, "step-00000004.ckpt"}
    assert train(ckpts, max_steps=5, every=0).started_at == 4


def test_rotation_keeps_latest_and_the_ones_before_it(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    train(ckpts, max_steps=6, every=1, keep=3)
    assert _names(ckpts) == {LATEST, *(f"step-{s:08d}.ckpt" for s in (4, 5, 6))}


def test_latest_naming_a_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / LATEST).write_text("step-00000004.ckpt")
    (ckpts / "step-00000006.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"step-00000004.ckpt.*train.resume=false"):
        latest_checkpoint(ckpts)


if __name__ == "__main__":  # the subprocess of the kill test
    train(Path(sys.argv[1]), max_steps=10, every=2, keep=1, plugins=[HalfWrittenAt(4)])
