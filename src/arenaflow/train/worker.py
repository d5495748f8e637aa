"""One rank of a run started by `arenaflow.train.launch`: `python -m arenaflow.train.worker cfg.yaml`."""

from __future__ import annotations

import logging
import sys

from omegaconf import OmegaConf

from arenaflow.train import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[rank %(process)d] %(name)s: %(message)s")
    run(OmegaConf.load(sys.argv[1]))
