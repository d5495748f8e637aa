"""Training stage (entry point: `stage.py`): Vicuna's recipe with Lightning FSDP2, and the base model."""

from arenaflow.train.base import register_base, resolve_base
from arenaflow.train.recipe import TrainPlan, fit, output_dir, plan
from arenaflow.train.stage import run

__all__ = ["TrainPlan", "fit", "output_dir", "plan", "register_base", "resolve_base", "run"]
