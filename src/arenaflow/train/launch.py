"""Start the ranks of a multi-device run on this node with torchrun, streaming their output.

Every rank trains on exactly the config the launcher planned: the live copy (secrets and all) travels
in the ranks' environment, never on disk; `launch_config.yaml` next to the run is the redacted copy a
person reads. Rank 0 writes result.json, which the launcher reads back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from arenaflow.redact import redacted_yaml
from arenaflow.train.recipe import TrainPlan
from arenaflow.train.reporting import REPORTER_ENV

log = logging.getLogger(__name__)

CONFIG_ENV = "ARENAFLOW_RANK_CONFIG"


def externally_launched() -> bool:
    """True when torchrun or SLURM already started one process per rank."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_rank_config(cfg: DictConfig, out: Path) -> tuple[Path, dict[str, str]]:
    """Write the redacted `launch_config.yaml` into `out`; return it and the env carrying the live copy."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "launch_config.yaml"
    path.write_text(redacted_yaml(cfg))
    return path, {CONFIG_ENV: OmegaConf.to_yaml(cfg, resolve=True)}


def launch_ranks(cfg: DictConfig, p: TrainPlan, sink: Callable[[str], None]) -> dict[str, Any]:
    if int(cfg.hardware.num_nodes) > 1:
        raise ValueError(
            f"hardware.num_nodes={cfg.hardware.num_nodes}: start multi-node runs on every node with "
            "torchrun (torchrun --nnodes N --nproc_per_node D --rdzv_endpoint HOST:PORT -m "
            "arenaflow.train ...) or srun; see README 'GPUs and clusters'"
        )
    out = Path(p.out_dir)
    cfg_path, cfg_env = stage_rank_config(cfg, out)
    result_path = out / "result.json"
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={cfg.hardware.devices}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "arenaflow.train.worker",
        str(cfg_path),
    ]
    env = {k: v for k, v in os.environ.items() if k != REPORTER_ENV}  # this process reports
    env.update(cfg_env)
    env.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(cfg.hardware.devices)))
    )
    sink(f"launching {cfg.hardware.devices} ranks: {' '.join(cmd)}")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        if " step " in f" {line}" or "checkpoint" in line or "Error" in line:
            sink(line.rstrip())
    rc = proc.wait()
    if rc != 0 or not result_path.exists():
        raise RuntimeError(
            f"training ranks failed (exit code {rc}); see the log above ({cfg_path})"
        )
    return json.loads(result_path.read_text())


def rank_config(path: str | Path) -> DictConfig:
    """The config a rank trains on: the launcher's live copy, else the file (ranks started by hand)."""
    text = os.environ.pop(CONFIG_ENV, None)  # popped: the rank's own children do not inherit it
    return OmegaConf.create(text) if text else OmegaConf.load(path)
