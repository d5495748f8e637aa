"""`python -m arenaflow.serve.launch <resolved-config.yaml>`: a deployment's server process.

The `serving_deployment` asset writes the exact config it resolved and starts this module
detached, so the server runs what was tested. The file holds no secret: the API keys arrive in
the variable its `serve.api_keys_env` names, and any other redacted value the server needs (a
password inside a database or tracking URL) as JSON in `$ARENAFLOW_DEPLOY_SECRETS`, put back here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import MutableMapping

from omegaconf import DictConfig, OmegaConf

from arenaflow.serve import run_cli
from arenaflow.serve.process import SECRETS_ENV


def restore_secrets(cfg: DictConfig, environ: MutableMapping[str, str]) -> None:
    """Put the values the deployment redacted from the file back (and drop them from the env)."""
    for path, value in json.loads(environ.pop(SECRETS_ENV, None) or "{}").items():
        OmegaConf.update(cfg, path, value, merge=False)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m arenaflow.serve.launch <resolved-config.yaml>")
    cfg = OmegaConf.load(argv[0])
    if not isinstance(cfg, DictConfig):
        raise SystemExit(f"{argv[0]} is not a config mapping")
    restore_secrets(cfg, os.environ)
    logging.basicConfig(
        level=str(cfg.serve.log_level).upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    run_cli(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
