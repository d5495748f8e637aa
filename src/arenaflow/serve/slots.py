"""`ModelSlot`: one served model inside the app — its card, its loaded engine and its own batcher.

The app holds one slot per configured model (`serve.models`), in config order, so every request
to a model shares that model's `Scheduler` (continuous batching) while models never wait on each
other's decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from arenaflow.engine import Engine, Scheduler
from arenaflow.serve.loading import ServedModel


@dataclass
class ModelSlot:
    """A model the app serves under `name` (the id clients send as `model`)."""

    name: str
    served: ServedModel
    engine: Engine
    scheduler: Scheduler
