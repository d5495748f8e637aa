"""One rank of a run started by `arenaflow.train.launch`: `python -m arenaflow.train.worker cfg.yaml`."""

from __future__ import annotations

import logging
import sys

from arenaflow.train import run
from arenaflow.train.launch import rank_config

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[rank %(process)d] %(name)s: %(message)s")
    run(rank_config(sys.argv[1]))
