"""`create_app(cfg)`: the OpenAI-compatible FastAPI app around one or more models, each with its batcher.

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (both streamed as SSE on request;
routes.py), /health, /ready and /metrics (here) and the arena (`arenaflow.arena.routes`, serve.arena). Every served model
(`serve.models`, default the single `serve.model_uri`) has its own `Scheduler`: concurrent
requests to a model share its decode steps (continuous batching); a full queue answers 429, a
client that leaves (streamed or not) frees its rows, and every request has a time limit
(`serve.request_timeout_s`; generation.py).

What one request may cost is bounded before it reaches a queue (messages, characters, rows =
prompts x n, stop strings), so no request can starve or crash the others; with API keys set, every
route but /health (and the bare readiness status) needs one, and the `Host` header must be one of
`serve.allowed_hosts` (security.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.trustedhost import TrustedHostMiddleware

from arenaflow.arena.routes import arena_router
from arenaflow.engine import Engine, Scheduler
from arenaflow.serve.adapters import load_group, plan_served_memory, shared_bases
from arenaflow.serve.errors import ServeConfigError, install_error_handlers
from arenaflow.serve.loading import (
    ServedModel,
    describe_engine,
    load_engine,
    model_aliases,
    model_specs,
    resolve_served_model,
)
from arenaflow.serve.memory import check_memory
from arenaflow.serve.metrics import ServeMetrics, batch_sampler
from arenaflow.serve.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from arenaflow.serve.routes import openai_router
from arenaflow.serve.security import KeyCheck, allowed_hosts, api_keys_from_cfg
from arenaflow.serve.slots import ModelSlot, ServeState
from arenaflow.serve.upstream import (
    check_engine_processes,
    launch_engine_processes,
    open_upstream,
    upstream_problems,
)

log = logging.getLogger(__name__)


def create_app(
    cfg: DictConfig,
    *,
    engines: dict[str, Engine] | None = None,
    served_models: dict[str, ServedModel] | None = None,
) -> FastAPI:
    """The app for `cfg.serve`; the models load in its lifespan (before /ready answers 200).

    `engines` (served name -> loaded engine) skip loading those models; `served_models` are
    already resolved cards (what `preflight` returns). A bad `serve.models` (duplicate names,
    missing fields) raises ServeConfigError here; a set that does not fit in memory raises
    ModelsDoNotFitError in the lifespan, before any weights load.
    """
    specs = model_specs(cfg)
    check_engine_processes(specs)  # vLLM installed, upstream keys set
    preloaded = dict(engines or {})
    unknown = sorted(set(preloaded) - {s.name for s in specs})
    if unknown:
        raise ServeConfigError(
            f"engines given for {unknown}, which are not served models "
            f"(serve.models names: {[s.name for s in specs]})"
        )
    state = ServeState(cfg=cfg, metrics=ServeMetrics(lambda: state.stats()), api_keys=[])
    state.api_keys = api_keys_from_cfg(cfg)
    state.specs = specs
    state.explicit_aliases = model_aliases(cfg, specs)  # serve.aliases
    state.aliases = dict(state.explicit_aliases)  # they win over automatic ones (URIs, versions)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:  # a model that fails to load stops the engine processes started before it
            await load_models(state, preloaded, dict(served_models or {}))
            for slot in state.models.values():
                slot.scheduler.start()
            state.ready = True
            state.metrics.ready.set(1)
            log.info("serving %d model(s): %s", len(state.models), ", ".join(state.models))
            async with batch_sampler(state.metrics):
                yield
        finally:
            state.ready = False
            state.metrics.ready.set(0)
            for slot in state.models.values():
                await slot.scheduler.close()

    app = FastAPI(title="arenaflow", version="0.1.0", lifespan=lifespan)
    app.state.serve = state
    install_error_handlers(app)
    keys = KeyCheck(state.api_keys)
    app.include_router(openai_router(state, keys))
    app.include_router(status_router(state, keys))
    app.include_router(arena_router(state))  # GET /arena and its API (serve.arena)
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(cfg.serve.max_body_bytes))
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)  # counts 413s
    app.add_middleware(  # outermost: a foreign Host is refused before anything runs
        TrustedHostMiddleware, allowed_hosts=allowed_hosts(cfg.serve), www_redirect=False
    )
    return app


async def load_models(
    state: ServeState, preloaded: dict[str, Engine], resolved: dict[str, ServedModel]
) -> None:
    """Resolve every served model, check the set fits in memory, then load and slot each; models
    over one base (adapters, serve/adapters.py) share one copy of it and one scheduler."""
    cfg = state.cfg
    local = [spec for spec in state.specs if spec.in_process]
    for spec in local:
        if spec.name not in resolved:
            resolved[spec.name] = await asyncio.to_thread(resolve_served_model, cfg, spec)
    served = {spec.name: resolved[spec.name] for spec in local}
    state.memory = await asyncio.to_thread(plan_served_memory, cfg, served, set(preloaded))
    check_memory(state.memory)
    state.metrics.set_memory(state.memory)
    shared: dict[str, Any] = {}
    for base, names in shared_bases(served, set(preloaded)).items():
        shared.update(await asyncio.to_thread(load_group, cfg, base, names, served))
    processes = await launch_engine_processes(cfg, state.specs, resolved)
    for spec in state.specs:
        if not spec.in_process:  # an engine process serves it (serve/upstream.py)
            slot = await open_upstream(cfg, spec, resolved.get(spec.name), processes.get(spec.name))
            state.add(slot)
            continue
        sm = served[spec.name]
        if spec.name in shared:
            eng, scheduler = shared[spec.name]
        else:
            eng = preloaded.get(spec.name) or await asyncio.to_thread(load_engine, cfg, sm)
            scheduler = Scheduler(
                eng,
                max_batch_size=int(cfg.serve.max_batch_size),
                max_queue=int(cfg.serve.max_queue),
            )
        describe_engine(sm, eng)
        state.add(ModelSlot(name=spec.name, served=sm, engine=eng, scheduler=scheduler))


def status_router(state: ServeState, keys: KeyCheck) -> APIRouter:
    """/health (always open), /ready (bare status open, details with a key) and /metrics."""
    router = APIRouter()
    public = bool(state.cfg.serve.get("public_metrics", False))

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        detailed = public or keys.has_key(request)  # load balancers see only the status
        down = await upstream_problems(state)  # engine processes that cannot serve now
        if down:
            body = {"status": "engine_unavailable", **({"models": down} if detailed else {})}
            return JSONResponse(body, status_code=503)
        if not detailed:
            return JSONResponse({"status": "ready"})
        return JSONResponse(ready_details(state))

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not public:
            await keys.require(request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


def ready_details(state: ServeState) -> dict[str, Any]:
    first = next(iter(state.models.values())).served.card
    memory = state.memory.as_dict() if state.memory else {}
    models = [
        {
            "id": name,
            "version": s.served.card.get("version"),
            "root": s.served.card.get("root"),
            "memory_estimate_bytes": memory.get("models", {}).get(name, {}).get("total_bytes"),
        }
        for name, s in state.models.items()
    ]
    return {
        "status": "ready",
        "model": first["id"],
        "version": first.get("version"),
        "models": models,
        "memory": memory,
    }
