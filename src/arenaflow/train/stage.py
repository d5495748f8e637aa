"""Training stage: fine-tune the base model on `sft_dataset` with Vicuna's recipe (Lightning, FSDP2).

`run(cfg)` is the one entry point (Hydra CLI `python -m arenaflow.train ...`, also what the Dagster asset
launches through Dagster Pipes). It plans and preflights the run, then trains in this process, or, when the
hardware target has several devices and no launcher started the ranks, starts them with torchrun.
Under torchrun / SLURM (`torchrun --nnodes 2 --nproc_per_node 8 -m arenaflow.train
hardware=h100_8x_2nodes ...`, `srun python -m arenaflow.train ...`) every rank runs `run(cfg)`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from arenaflow.train.launch import externally_launched, launch_ranks
from arenaflow.train.recipe import fit, plan
from arenaflow.train.reporting import reporter_session

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and register the model; returns the finetuned_model value (path, model_uri, version, ...)."""
    with reporter_session() as reporter:
        p = plan(cfg)
        reporter.log(
            f"training {cfg.model.name}: {p.world_size} rank(s), accumulate {p.accumulate}, "
            f"output {p.out_dir}"
        )
        if p.world_size > 1 and not externally_launched():
            result = launch_ranks(cfg, p, reporter.log)
        else:
            result = fit(cfg, p, sink=reporter.log if int(os.environ.get("RANK", 0)) == 0 else None)
        reporter.report(result)
    # the full per-step history stays in result.json; the returned value is small
    return {k: v for k, v in result.items() if k not in ("history", "val_history")}
