"""`python -m arenaflow.serve.launch <resolved-config.yaml>`: a deployment's server process.

The `serving_deployment` asset writes the exact config it resolved and starts this module
detached, so the server runs what was tested. The file holds no secret: the API keys arrive in
the variable its `serve.api_keys_env` names, and any other redacted value the server needs (a
password inside a database or tracking URL) as JSON in `$ARENAFLOW_DEPLOY_SECRETS`, put back here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from collections.abc import MutableMapping

from omegaconf import DictConfig, OmegaConf

from arenaflow.serve.process import SECRETS_ENV

PORT_TAKEN = errno.EADDRINUSE  # exit code when the port is taken (the deployment retries another)


def restore_secrets(cfg: DictConfig, environ: MutableMapping[str, str]) -> None:
    """Put the values the deployment redacted from the file back (and drop them from the env)."""
    for path, value in json.loads(environ.pop(SECRETS_ENV, None) or "{}").items():
        OmegaConf.update(cfg, path, value, merge=False)


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound now: checked before the model loads, so a port taken since the
    deployment chose it fails in a second, not after the load (uvicorn binds only then)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m arenaflow.serve.launch <resolved-config.yaml>")
    cfg = OmegaConf.load(argv[0])
    if not isinstance(cfg, DictConfig):
        raise SystemExit(f"{argv[0]} is not a config mapping")
    restore_secrets(cfg, os.environ)
    host, port = str(cfg.serve.host), int(cfg.serve.port)
    if not port_free(host, port):
        print(f"[Errno {PORT_TAKEN}] {host}:{port}: address already in use", flush=True)
        raise SystemExit(PORT_TAKEN)
    logging.basicConfig(
        level=str(cfg.serve.log_level).upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from arenaflow.serve import run_cli  # torch and the app: after the cheap checks

    run_cli(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
