"""`python -m arenaflow.serve.launch <resolved-config.yaml>`: a deployment's server process.

The `serving_deployment` asset writes the exact config it resolved (secrets removed; API keys come
through the environment) and starts this module detached, so the server runs what was tested.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig, OmegaConf

from arenaflow.serve import run_cli


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m arenaflow.serve.launch <resolved-config.yaml>")
    cfg = OmegaConf.load(argv[0])
    if not isinstance(cfg, DictConfig):
        raise SystemExit(f"{argv[0]} is not a config mapping")
    logging.basicConfig(
        level=str(cfg.serve.log_level).upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    run_cli(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
