"""What the app serves: one `ModelSlot` per model, held by the app's `ServeState`.

The app holds one slot per configured model (`serve.models`), in config order, so every request
to a model shares that model's `Scheduler` (continuous batching) while models never wait on each
other's decode steps.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from arenaflow.engine import Engine, Scheduler
from arenaflow.serve.errors import APIError
from arenaflow.serve.loading import ModelSpec, ServedModel
from arenaflow.serve.memory import MemoryPlan
from arenaflow.serve.metrics import ServeMetrics


@dataclass
class ModelSlot:
    """A model the app serves under `name` (the id clients send as `model`)."""

    name: str
    served: ServedModel
    engine: Engine
    scheduler: Scheduler


@dataclass
class ServeState:
    """What the app holds: one `ModelSlot` per served model (config order) once the lifespan started."""

    cfg: DictConfig
    metrics: ServeMetrics
    api_keys: list[str]
    specs: list[ModelSpec] = field(default_factory=list)
    models: dict[str, ModelSlot] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # other ids a client may send -> name
    explicit_aliases: dict[str, str] = field(default_factory=dict)  # serve.aliases
    memory: MemoryPlan | None = None  # the start-up estimate (serve/memory.py)
    ready: bool = False
    fingerprint: str = field(default_factory=lambda: f"fp_{uuid.uuid4().hex[:10]}")

    def slot(self, name: str) -> ModelSlot:
        """The slot serving `name` (its name, its URI or its pinned registry version)."""
        if not self.ready:
            raise APIError(503, "the models are still loading; retry when /ready answers 200")
        key = name if name in self.models else self.aliases.get(name)
        if key is None:
            raise APIError(
                404,
                f"the model {name!r} does not exist on this server; it serves "
                f"{', '.join(repr(n) for n in self.models)}",
                param="model",
                code="model_not_found",
            )
        return self.models[key]

    def add(self, slot: ModelSlot) -> None:
        self.models[slot.name] = slot
        for alias in slot.served.names:
            if alias != slot.name and alias not in self.models:
                self.aliases.setdefault(alias, slot.name)

    def card(self, name: str) -> dict[str, Any]:
        """The model card of a served name or of an alias from serve.aliases (under the alias's id)."""
        target = self.explicit_aliases.get(name)
        if target is not None:
            return {**self.models[target].served.card, "id": name, "parent": target}
        return self.slot(name).served.card

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each model's scheduler stats (queue depth, running rows, counters), by name."""
        return {name: s.scheduler.stats() for name, s in list(self.models.items())}
