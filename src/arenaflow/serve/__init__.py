"""The OpenAI-compatible HTTP endpoint: `create_app(cfg)` for uvicorn, `run(cfg)` to serve in the foreground.

`python -m arenaflow.serve serve.model_uri=<models:/name@alias | checkpoint folder>` (or `make serve`)
runs the same app that the `serving_deployment` asset starts as a detached process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from arenaflow.serve.app import create_app

log = logging.getLogger(__name__)

CONFIG_ENV = "ARENAFLOW_SERVE_CONFIG"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Serve `cfg.serve.model_uri` on serve.host:serve.port until interrupted."""
    import uvicorn

    host, port = str(cfg.serve.host), int(cfg.serve.port)
    log.info("serving %s on http://%s:%d/v1", cfg.serve.model_uri, host, port)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=str(cfg.serve.log_level))
    return {"url": f"http://{host}:{port}/v1", "model_uri": str(cfg.serve.model_uri)}


def app_from_env() -> Any:
    """uvicorn `--factory` entry: the app for the resolved config YAML named by $ARENAFLOW_SERVE_CONFIG."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(
            f"${CONFIG_ENV} must name a resolved config YAML (the deployment writes one)"
        )
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return create_app(cfg)


__all__ = ["CONFIG_ENV", "app_from_env", "create_app", "run"]
