"""Models an engine process serves: the gateway forwards their requests and keeps its own contract.

A served model whose engine is a process (`vllm serve` on GPUs, launched by the app with
`engine: vllm`; or any OpenAI-compatible server that runs already, `upstream: {url, model,
api_key_env}`: llama.cpp's, another arenaflow server) sits in its slot as an `Upstream` in place
of a `Scheduler`. The routes check the request as for any model (API keys, sizes, unsupported
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
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import DictConfig

from arenaflow.redact import redact
from arenaflow.serve.engine_process import EngineProcess, launch_vllm, require_vllm
from arenaflow.serve.errors import APIError, ServeConfigError, error_body
from arenaflow.serve.generation import disconnected
from arenaflow.serve.loading import ModelSpec, ServedModel, UpstreamSpec, resolve_served_model
from arenaflow.serve.slots import ModelSlot, ServeState
from arenaflow.serve.streams import sse_event

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0  # a readiness probe of the engine (/ready asks every engine)
CONNECT_TIMEOUT_S = 5.0


class Upstream:
    """What a slot's scheduler is for a model an engine process serves: bounded in-flight requests
    forwarded with httpx (the `openai` client's own HTTP library, async and streaming; the engine
    process, not the gateway, queues and batches them)."""

    def __init__(
        self,
        name: str,
        spec: UpstreamSpec,
        api_key: str | None,
        *,
        timeout_s: float,
        max_in_flight: int,
        retry_after: str = "1",
        process: EngineProcess | None = None,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.name, self.spec, self.process = name, spec, process
        self.stop_timeout_s = stop_timeout_s
        self.retry_after = retry_after
        self.url = spec.url
        self.shown_url = redact(spec.url)  # a password in the URL never reaches a message
        self.max_in_flight = max_in_flight
        self.timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=f"{self.url}/", headers=headers)
        self.counts = {"completed": 0, "rejected": 0, "failed": 0, "cancelled": 0}
        self.running = 0

    def start(self) -> None:
        pass  # the engine process runs on its own; nothing to start in the app

    async def close(self) -> None:
        await self._client.aclose()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop, self.stop_timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "queue_depth": 0, **self.counts}

    # -- the engine's state ----------------------------------------------------------------------
    async def card(self) -> dict[str, Any] | None:
        """The engine's card for its model (None when unreachable or it does not list it)."""
        try:
            resp = await self._client.get("models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        data = resp.json().get("data") or []
        return next((c for c in data if c.get("id") == self.spec.model), None)

    async def problem(self) -> str | None:
        """Why the engine cannot serve now (for /ready), or None."""
        try:
            resp = await self._client.get("models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as e:
            return f"the engine process at {self.shown_url} is unreachable ({type(e).__name__})"
        if resp.status_code != 200:
            return f"the engine process at {self.shown_url} answers /models with {resp.status_code}"
        ids = [c.get("id") for c in resp.json().get("data") or []]
        if self.spec.model not in ids:
            return f"the engine process at {self.shown_url} does not serve {self.spec.model!r}"
        return None

    # -- requests --------------------------------------------------------------------------------
    def _admit(self) -> None:
        if self.running >= self.max_in_flight:
            self.counts["rejected"] += 1
            raise APIError(
                429,
                f"{self.max_in_flight} requests to {self.name} are in flight (serve.max_queue); "
                "retry later",
                code="queue_full",
                headers={"Retry-After": self.retry_after},
            )
        self.running += 1

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """One request to the engine: admitted, counted, its failures as the gateway's errors."""
        self._admit()
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # the client left
            self.counts["cancelled"] += 1
            raise
        except APIError as e:
            self.counts["rejected" if e.status == 429 else "failed"] += 1
            raise
        except httpx.HTTPError as e:
            self.counts["failed"] += 1
            raise self._mapped(e) from e
        except ValueError as e:  # a body or chunk that is not JSON
            self.counts["failed"] += 1
            message = f"the engine process of {self.name} sent what is not JSON ({e})"
            raise APIError(502, message, code="engine_error") from e
        else:
            self.counts["completed"] += 1
        finally:
            self.running -= 1

    async def submit(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The engine's answer to one request (its body), or the APIError it maps to."""
        async with self._call():
            resp = await self._client.post(endpoint, json=payload, timeout=self.timeout)
            if resp.status_code != 200:
                raise self.error(resp.status_code, resp.content, resp.headers)
            return resp.json()

    async def stream(self, endpoint: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The engine's stream chunks (parsed); the first `__anext__` raises an error status."""
        async with self._call():
            request = self._client.build_request(
                "POST", endpoint, json=payload, timeout=self.timeout
            )
            resp = await self._client.send(request, stream=True)
            try:
                if resp.status_code != 200:
                    raise self.error(resp.status_code, await resp.aread(), resp.headers)
                async for line in resp.aiter_lines():
                    data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                    if data and data != "[DONE]":
                        yield json.loads(data)
            finally:
                await resp.aclose()

    def _mapped(self, e: httpx.HTTPError) -> APIError:
        if isinstance(e, httpx.TimeoutException):
            message = f"the engine process of {self.name} did not answer in time"
            return APIError(504, f"{message} (serve.request_timeout_s)", code="timeout")
        return APIError(
            503,
            f"the engine process serving {self.name} at {self.shown_url} is unreachable "
            f"({type(e).__name__}); start it (or fix its url), then retry",
            code="engine_unavailable",
        )

    def error(self, status: int, content: bytes, headers: httpx.Headers) -> APIError:
        """An error status of the engine as the gateway's: what the client caused keeps its
        status and the engine's message; what the set-up causes is a 502 naming the fix."""
        message, param, code = _error_fields(content)
        engine = f"the engine process of {self.name} ({self.shown_url})"
        if status == 429:
            retry = {"Retry-After": headers["retry-after"]} if "retry-after" in headers else {}
            return APIError(429, message, param=param, code=code or "rate_limited", headers=retry)
        if status in (401, 403):
            return APIError(
                502,
                f"{engine} refused the gateway's key ({status}); set the variable its "
                "upstream.api_key_env names to the engine's key",
                code="engine_auth",
            )
        if status == 404:
            return APIError(502, f"{engine} answered 404: {message}", code="engine_not_found")
        if 400 <= status < 500:
            return APIError(400 if status == 422 else status, message, param=param, code=code)
        if status in (503, 504):
            return APIError(status, f"{engine}: {message}", code=code or "engine_unavailable")
        return APIError(502, f"{engine} failed ({status}): {message}", code="engine_error")


def _error_fields(content: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) of an OpenAI-style error body (vLLM's, ours) or a plain one."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500] or "no message", None, None
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        message = err.get("message") or err.get("detail") or json.dumps(err)[:500]
        code = err.get("code")
        return str(message), err.get("param"), None if code is None else str(code)
    return str(err)[:500], None, None


async def open_upstream(cfg: DictConfig, spec: ModelSpec, served: ServedModel | None) -> ModelSlot:
    """The slot of an engine-process model: launch `vllm serve` (engine: vllm) or reach the
    configured upstream, and its card (the engine's, under the gateway's name, with lineage)."""
    serve = cfg.serve
    process = None
    if spec.upstream is not None:
        up, key = spec.upstream, _upstream_key(spec)
    else:
        if served is None:
            served = await asyncio.to_thread(resolve_served_model, cfg, spec)
        assert served.path is not None
        process = await asyncio.to_thread(launch_vllm, cfg, spec.name, served.path, spec.origin)
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
