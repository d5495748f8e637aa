"""The OpenAI-compatible HTTP endpoint: `create_app(cfg)` for uvicorn, `run(cfg)` to serve in the foreground.

`python -m arenaflow.serve serve.model_uri=<models:/name@alias | checkpoint folder>` (or `make serve`)
runs the same app that the `serving_deployment` asset starts as a detached process.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from arenaflow.serve.app import ServeState, create_app
from arenaflow.serve.errors import ServeConfigError
from arenaflow.serve.slots import ModelSlot

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Serve `cfg.serve.model_uri` on serve.host:serve.port until interrupted."""
    import uvicorn

    host, port = str(cfg.serve.host), int(cfg.serve.port)
    log.info("serving %s on http://%s:%d/v1", cfg.serve.model_uri, host, port)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=str(cfg.serve.log_level))
    return {"url": f"http://{host}:{port}/v1", "model_uri": str(cfg.serve.model_uri)}


__all__ = ["ModelSlot", "ServeConfigError", "ServeState", "create_app", "run"]
