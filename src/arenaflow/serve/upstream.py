"""Models an engine process serves: the gateway forwards their requests and keeps its own contract.

A served model whose engine is a process (`vllm serve` on GPUs, launched by the app with
`engine: vllm`; or any OpenAI-compatible server that runs already, `upstream: {url, model,
api_key_env}`: llama.cpp's, another arenaflow server) sits in its slot as an `Upstream`
(serve/engine_client.py) in place of a `Scheduler`. The routes check the request as for any model (API keys, sizes, unsupported
fields), then `forward` sends the client's JSON to the engine under the engine's model id, with
the engine's key (never the client's, never logged or shown), and answers with the engine's body
under the gateway's model name. The engine renders the chat with its own copy of the template.

Errors keep their meaning: a 4xx the client caused (400 with the engine's message, 429 with its
Retry-After) is the gateway's; the engine refusing the gateway's key or model id, or failing, is a
502 naming the entry to fix; an engine that cannot be reached is a 503 (and /ready says so).
Usage, time to first token and request counts go into the gateway's metrics: a stream always asks
the engine for its usage chunk and passes it on only when the client asked for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig

from arenaflow.redact import redact
from arenaflow.serve.engine_client import Upstream
from arenaflow.serve.engine_process import EngineProcess, launch_vllm, require_vllm
from arenaflow.serve.errors import APIError, ServeConfigError, error_body
from arenaflow.serve.generation import disconnected
from arenaflow.serve.loading import ModelSpec, ServedModel, UpstreamSpec, resolve_served_model
from arenaflow.serve.slots import ModelSlot, ServeState
from arenaflow.serve.streams import sse_event

__all__ = [
    "Upstream",
    "check_engine_processes",
    "forward",
    "is_upstream",
    "launch_engine_processes",
    "open_upstream",
]

log = logging.getLogger(__name__)


async def launch_engine_processes(
    cfg: DictConfig, specs: list[ModelSpec], resolved: dict[str, ServedModel]
) -> dict[str, EngineProcess]:
    """The engine process of each `engine: vllm` entry, by served name: one `vllm serve` per
    checkpoint, the entries that serve it as its names and the adapter entries over it as its
    LoRA modules, so adapters of one base share its weights and batches as in process."""
    entries = [s for s in specs if s.upstream is None and not s.in_process]
    for spec in entries:
        if spec.name not in resolved:
            resolved[spec.name] = await asyncio.to_thread(resolve_served_model, cfg, spec)
    groups: dict[Path, list[ModelSpec]] = {}
    for spec in entries:
        sm = resolved[spec.name]
        assert sm.path is not None
        groups.setdefault((sm.base or sm.path).resolve(), []).append(spec)
    out: dict[str, EngineProcess] = {}
    try:
        for checkpoint, members in groups.items():
            loras = {s.name: resolved[s.name].path for s in members if resolved[s.name].adapter}
            names = [s.name for s in members if s.name not in loras]
            names = names or [f"{next(iter(loras))}-base"]  # the base's name inside the engine
            process = await asyncio.to_thread(
                launch_vllm, cfg, names, checkpoint, members[0].origin, loras
            )
            out.update({s.name: process for s in members})
    except BaseException:
        for process in {id(p): p for p in out.values()}.values():
            await asyncio.to_thread(process.stop)
        raise
    return out


async def open_upstream(
    cfg: DictConfig,
    spec: ModelSpec,
    served: ServedModel | None,
    process: EngineProcess | None = None,
) -> ModelSlot:
    """The slot of an engine-process model: its `vllm serve` child (engine: vllm,
    `launch_engine_processes`) or the configured upstream, and its card (the engine's, under the
    gateway's name, with lineage)."""
    serve = cfg.serve
    if spec.upstream is not None:
        up, key = spec.upstream, _upstream_key(spec)
    else:
        assert process is not None, f"{spec.name}: no engine process launched for it"
        up, key = UpstreamSpec(process.url, spec.name), process.api_key
    upstream = Upstream(
        spec.name,
        up,
        key,
        timeout_s=float(serve.request_timeout_s),
        max_in_flight=int(serve.max_queue) + int(serve.max_batch_size),
        retry_after=str(int(serve.retry_after_s)),
        process=process,
        stop_timeout_s=float(serve.engine_process.stop_timeout_s),
    )
    engine_card = await upstream.card()
    if engine_card is None:
        log.warning("%s: %s; serving it when it answers", spec.name, await upstream.problem())
    card = _card(spec, up, engine_card or {}, served)
    served = served or ServedModel(path=None, names=[spec.name], card=card)
    served.card = card
    log.info("serving %s through the engine process at %s", spec.name, upstream.shown_url)
    return ModelSlot(name=spec.name, served=served, engine=None, scheduler=upstream)  # type: ignore[arg-type]


def check_engine_processes(specs: list[ModelSpec]) -> None:
    """Refuse at start-up, before any model loads, an engine process that cannot be had: vLLM not
    installed, an upstream key variable that is not set."""
    for spec in specs:
        if spec.upstream is not None:
            _upstream_key(spec)
        elif spec.engine == "vllm":
            require_vllm(spec.name, spec.origin)


def _upstream_key(spec: ModelSpec) -> str | None:
    assert spec.upstream is not None
    env = spec.upstream.api_key_env
    if env and not os.environ.get(env):
        raise ServeConfigError(
            f"{spec.origin}.upstream.api_key_env={env} ({spec.name}): ${env} is not set; export "
            "the engine's key in it (or leave api_key_env out for an engine without keys)"
        )
    return os.environ.get(env) if env else None


def _card(
    spec: ModelSpec, up: UpstreamSpec, engine: dict[str, Any], served: ServedModel | None
) -> dict[str, Any]:
    card = {**engine, **(served.card if served else {})}
    card.update({"id": spec.name, "object": "model", "owned_by": "arenaflow"})
    card.setdefault("created", int(time.time()))
    card.setdefault("root", engine.get("root") or up.model)
    card.setdefault("version", None)
    card.setdefault("results", {})
    lineage = dict(card.get("lineage") or {})
    lineage["engine"] = spec.engine or "upstream"
    if spec.upstream is not None:
        lineage.update({"upstream_url": redact(up.url), "upstream_model": up.model})
    card["lineage"] = lineage
    if "context_length" not in card and engine.get("max_model_len"):
        card["context_length"] = engine["max_model_len"]  # vLLM's name for it
    return card


def is_upstream(slot: ModelSlot) -> bool:
    return isinstance(slot.scheduler, Upstream)


async def upstream_problems(state: ServeState) -> dict[str, str]:
    """{model: why its engine process cannot serve} over every engine-process model (for /ready)."""
    ups = [s.scheduler for s in state.models.values() if isinstance(s.scheduler, Upstream)]
    found = await asyncio.gather(*(u.problem() for u in ups))
    return {u.name: p for u, p in zip(ups, found, strict=True) if p is not None}


async def forward(
    state: ServeState, slot: ModelSlot, endpoint: str, request: Request, include_usage: bool
) -> Any:
    """The client's request, checked by the routes, answered by the slot's engine process."""
    up = slot.scheduler
    assert isinstance(up, Upstream)
    payload = dict(await request.json())
    payload["model"] = up.spec.model
    path = endpoint.removeprefix("/v1/")
    t0 = time.perf_counter()
    if not payload.get("stream"):
        body = await _until_gone(up.submit(path, payload), request)
        state.metrics.ttft.labels(endpoint, slot.name).observe(time.perf_counter() - t0)
        _observe(state, slot.name, body.get("usage"))
        return JSONResponse({**body, "model": slot.name})
    payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    chunks = up.stream(path, payload).__aiter__()
    try:  # an error status of the engine is still the response's status
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise
    events = _events(state, slot.name, endpoint, chunks, first, include_usage, t0)
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _until_gone(aw: Any, request: Request) -> Any:
    """`aw`'s result, cancelled (499) when the client disconnects first."""
    task, gone = asyncio.ensure_future(aw), asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise APIError(499, "the client closed the request", code="client_closed")
        return task.result()
    finally:
        task.cancel()
        gone.cancel()


def _observe(state: ServeState, model: str, usage: dict[str, Any] | None) -> None:
    usage = usage or {}
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    state.metrics.observe_usage(model, int(prompt), int(completion))


async def _events(
    state: ServeState,
    model: str,
    endpoint: str,
    chunks: AsyncIterator[dict[str, Any]],
    item: dict[str, Any] | None,
    include_usage: bool,
    t0: float,
) -> AsyncIterator[str]:
    """The engine's chunks under the gateway's model name; its usage chunk only when asked for."""
    usage: dict[str, Any] | None = None
    first = True
    try:
        while item is not None:
            if "error" in item:
                yield sse_event(item)
                return
            if item.get("choices") and first:
                first = False
                state.metrics.ttft.labels(endpoint, model).observe(time.perf_counter() - t0)
            usage = item.get("usage") or usage
            item["model"] = model
            if include_usage:
                yield sse_event(item)
            elif item.get("choices") or not item.get("usage"):
                item.pop("usage", None)
                yield sse_event(item)
            try:
                item = await chunks.__anext__()
            except StopAsyncIteration:
                item = None
    except APIError as e:  # the engine failed or went away mid-stream
        yield sse_event(error_body(e.status, e.message, code=e.code))
        return
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
    _observe(state, model, usage)
    yield "data: [DONE]\n\n"
