"""The OpenAI-compatible HTTP endpoint: `create_app(cfg)` for uvicorn, `run(cfg)` to serve in the foreground.

`python -m arenaflow.serve serve.model_uri=<models:/name@alias | checkpoint folder>` (or `make serve`)
runs the same app that the `serving_deployment` asset starts as a detached process; with
`serve.models=[{name, uri}, ...]` (or `serve.models_from=competitors`) it serves several models.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from arenaflow.serve.adapters import plan_served_memory
from arenaflow.serve.app import create_app
from arenaflow.serve.errors import ServeConfigError
from arenaflow.serve.loading import ServedModel, model_specs, resolve_served_model
from arenaflow.serve.memory import MemoryPlan, check_memory
from arenaflow.serve.security import uvicorn_proxy_options

log = logging.getLogger(__name__)


def preflight(cfg: DictConfig) -> tuple[dict[str, ServedModel], MemoryPlan]:
    """Resolve every served model and check that the set fits, before any weights load."""
    from arenaflow.engine.backends import EngineSpec

    try:
        EngineSpec.from_cfg(cfg)  # model.quantization, engine.llamacpp.kv_cache
    except ValueError as e:
        raise ServeConfigError(str(e)) from e
    specs = [s for s in model_specs(cfg) if s.in_process]  # engine processes bring their own
    resolved = {spec.name: resolve_served_model(cfg, spec) for spec in specs}
    plan = plan_served_memory(cfg, resolved)  # a base that adapters share counts once
    check_memory(plan)
    return resolved, plan


def run(cfg: DictConfig) -> dict[str, Any]:
    """Serve the configured model(s) on serve.host:serve.port until interrupted.

    Raises ServeConfigError (ModelsDoNotFitError when the set does not fit) before uvicorn starts.
    """
    import uvicorn

    resolved, plan = preflight(cfg)
    host, port = str(cfg.serve.host), int(cfg.serve.port)
    log.info("serving %s on http://%s:%d/v1", ", ".join(resolved), host, port)
    app = create_app(cfg, served_models=resolved)
    proxy = uvicorn_proxy_options(cfg)  # X-Forwarded-For only from serve.trusted_proxies
    uvicorn.run(app, host=host, port=port, log_level=str(cfg.serve.log_level), **proxy)
    return {
        "url": f"http://{host}:{port}/v1",
        "model_uri": str(cfg.serve.model_uri),
        "models": {name: s.card.get("root") for name, s in resolved.items()},
        "memory_estimate_bytes": plan.total_bytes,
    }


def run_cli(cfg: DictConfig) -> dict[str, Any]:
    """`run` for command lines: a refused set-up exits non-zero with its message, no traceback."""
    try:
        return run(cfg)
    except ServeConfigError as e:
        raise SystemExit(f"arenaflow.serve: refusing to serve: {e}") from None
