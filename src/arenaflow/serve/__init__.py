"""The OpenAI-compatible endpoint (entry point: `stage.py`): `create_app(cfg)` for uvicorn, `run(cfg)`
to serve in the foreground (`python -m arenaflow.serve`, `make serve`)."""

from arenaflow.serve.app import create_app
from arenaflow.serve.errors import ServeConfigError
from arenaflow.serve.memory import MemoryPlan, ModelsDoNotFitError
from arenaflow.serve.slots import ModelSlot, ServeState
from arenaflow.serve.stage import preflight, run, run_cli

__all__ = [
    "MemoryPlan",
    "ModelSlot",
    "ModelsDoNotFitError",
    "ServeConfigError",
    "ServeState",
    "create_app",
    "preflight",
    "run",
    "run_cli",
]
