"""Served models over one shared base: adapters (and the base itself) on one copy of its weights.

`serve.models` entries that name adapter checkpoints are grouped by the base folder they resolve to,
together with a plain entry whose checkpoint is that base. On the hf engine a group loads the base
once with every adapter (`arenaflow.engine.adapters.load_shared`) and runs one scheduler, so all its
requests share decode steps (peft's mixed-adapter batches). On llama.cpp the base's GGUF is loaded
once and each entry is a context of its own over it, an adapter as its GGUF LoRA file
(`LlamaCppEngine.group`), with its own KV cache and scheduler. Either way each entry is its own
model in /v1/models, routed by name: fine-tunes meet in the arena for the weights of one model.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from arenaflow.engine import Engine, SamplingParams, Scheduler, StreamEvent
from arenaflow.engine.api import GenerationResult
from arenaflow.serve.errors import ServeConfigError
from arenaflow.serve.loading import ServedModel
from arenaflow.serve.memory import (
    DTYPE_BYTES,
    MemoryPlan,
    ModelMemory,
    count_parameters,
    llamacpp_options,
    plan_memory,
    serving_dtype,
)

log = logging.getLogger(__name__)


class AdapterScheduler:
    """One served entry's side of the scheduler its base runs (an adapter, or the base itself):
    its requests are made by its engine view and decode in the base's batch. Its stats are its
    own requests' (queue, rows, tokens, counters), so the /metrics series of the models of one
    base add up to the batch's; decode steps and the last step's size are the shared batch's."""

    def __init__(self, shared: Scheduler, engine: Engine) -> None:
        self.shared, self.engine = shared, engine

    def start(self) -> None:
        self.shared.start()

    async def close(self) -> None:
        await self.shared.close()

    async def submit(self, prompt: str, params: SamplingParams) -> GenerationResult:
        return await self.shared.submit(prompt, params, engine=self.engine)

    def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        return self.shared.stream(prompt, params, engine=self.engine)

    def stats(self) -> dict[str, Any]:
        return self.shared.stats(adapter=self.engine.adapter)


def shared_bases(
    served: dict[str, ServedModel], preloaded: Collection[str] = ()
) -> dict[Path, list[str]]:
    """{base folder: served names on it, config order} for every base an adapter names; a plain
    entry serving that folder joins its group. Preloaded engines keep their own weights."""
    groups: dict[Path, list[str]] = {
        sm.base.resolve(): [] for n, sm in served.items() if sm.base and n not in preloaded
    }
    for name, sm in served.items():
        key = (sm.base or sm.path).resolve()
        if name not in preloaded and key in groups:
            groups[key].append(name)
    return groups


def load_group(
    cfg: DictConfig, base: Path, names: list[str], served: dict[str, ServedModel]
) -> dict[str, tuple[Engine, Scheduler | AdapterScheduler]]:
    """(engine, scheduler) of each served name of one base, on one copy of its weights: on
    llama.cpp (when engine.backend picks it) an engine and scheduler per name, each adapter a
    GGUF LoRA in its own context; on the hf engine one model and one scheduler for all."""
    if llamacpp_options(cfg) is not None:
        try:
            return _llamacpp_group(cfg, base, names, served)
        except ValueError as e:  # an adapter llama.cpp cannot apply
            if cfg.engine.backend != "auto":
                raise ServeConfigError(f"serving {', '.join(names)} over {base}: {e}") from e
            log.warning("%s stay on the hf engine: %s", ", ".join(names), e)
    return _hf_group(cfg, base, names, served)


def _llamacpp_group(
    cfg: DictConfig, base: Path, names: list[str], served: dict[str, ServedModel]
) -> dict[str, tuple[Engine, Scheduler | AdapterScheduler]]:
    from arenaflow.engine.backends import EngineSpec
    from arenaflow.engine.llamacpp import LlamaCppEngine

    spec = EngineSpec.from_cfg(cfg)
    batch = int(cfg.serve.max_batch_size)
    models = {n: served[n].path if served[n].adapter is not None else None for n in names}
    engines = LlamaCppEngine.group(
        base,
        models,
        max_batch_size=batch,
        quantization=spec.quantization,
        cache_dir=spec.cache_dir,
        **spec.llamacpp,
    )
    log.info("serving %s on llama.cpp over one copy of %s", ", ".join(names), base)
    queue = int(cfg.serve.max_queue)
    return {n: (e, Scheduler(e, max_batch_size=batch, max_queue=queue)) for n, e in engines.items()}


def _hf_group(
    cfg: DictConfig, base: Path, names: list[str], served: dict[str, ServedModel]
) -> dict[str, tuple[Engine, Scheduler | AdapterScheduler]]:
    from arenaflow.engine.adapters import load_shared

    dtype, device = serving_dtype(cfg)
    batch = int(cfg.serve.max_batch_size)
    adapters = {n: served[n].path for n in names if served[n].adapter is not None}
    try:
        engine, views = load_shared(
            base, adapters, dtype=dtype, device=device, max_batch_size=batch
        )
    except ValueError as e:
        raise ServeConfigError(f"serving {', '.join(names)} over {base}: {e}") from e
    scheduler = Scheduler(engine, max_batch_size=batch, max_queue=int(cfg.serve.max_queue))
    out: dict[str, tuple[Engine, Scheduler | AdapterScheduler]] = {}
    for name in names:
        if name in views:
            out[name] = (views[name], AdapterScheduler(scheduler, views[name]))
        elif not engine.tokenizer.chat_template:
            raise ServeConfigError(f"{name}: checkpoint {base} has no chat template to serve with")
        else:
            out[name] = (engine, AdapterScheduler(scheduler, engine))
    log.info("serving %s on one copy of %s", ", ".join(names), base)
    return out


def plan_served_memory(
    cfg: DictConfig, served: dict[str, ServedModel], preloaded: Collection[str] = ()
) -> MemoryPlan:
    """The memory plan with each shared base counted once (weights and the one KV cache of its
    batch, under the group's first name) and every adapter's own weights on top."""
    groups = shared_bases(served, preloaded)
    grouped = {n: base for base, names in groups.items() for n in names}
    paths: dict[str, Path] = {}
    for name, sm in served.items():
        if name not in grouped:  # a preloaded adapter is estimated as its base
            paths[name] = sm.base or sm.path
        elif groups[grouped[name]][0] == name:
            paths[name] = grouped[name]
    llama = llamacpp_options(cfg) is not None
    plan = plan_memory(cfg, paths, set(preloaded), on_hf=set() if llama else set(grouped))
    dtype, _ = serving_dtype(cfg)
    by_name = {m.name: m for m in plan.models}
    for name, sm in served.items():
        if sm.adapter is None or name not in grouped:
            continue
        # llama.cpp: the adapter's f32 LoRA file and a context (KV cache) of its own
        weights = count_parameters(sm.path, {}) * (4 if llama else DTYPE_BYTES[dtype])
        if name in by_name:
            by_name[name].weights_bytes += weights
            continue
        first = by_name[groups[grouped[name]][0]]
        kv = first.kv_cache_bytes if llama else 0
        plan.models.append(
            ModelMemory(name, weights, kv, first.dtype, first.context_length, first.max_batch_size)
        )
    plan.models.sort(key=lambda m: list(served).index(m.name))
    shared = "'s weights (a KV cache each, on llama.cpp)" if llama else " and its KV cache"
    for base, names in groups.items():
        plan.notes.append(f"{', '.join(names)} share one copy of {base}{shared}")
    return plan
