"""`create_app(cfg)`: the OpenAI-compatible FastAPI app around one or more models, each with its batcher.

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (both streamed as SSE on request),
/health, /ready and /metrics. Every served model (`serve.models`, default the single
`serve.model_uri`) has its own `Scheduler`: concurrent requests to a model share its decode steps
(continuous batching); a full queue answers 429, a client that leaves (streamed or not) frees its
rows, and every request has a time limit (`serve.request_timeout_s`).

What one request may cost is bounded before it reaches a queue (messages, characters, rows =
prompts x n, stop strings), so no request can starve or crash the others; with API keys set, every
route but /health (and the bare readiness status) needs one, and the `Host` header must be one of
`serve.allowed_hosts` (DNS rebinding cannot reach a local server).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from omegaconf import DictConfig
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.trustedhost import TrustedHostMiddleware

from arenaflow.engine import (
    Engine,
    GenerationResult,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
    SamplingParams,
    Scheduler,
    StreamEvent,
    TokenLogprob,
)
from arenaflow.serve.arena import arena_router
from arenaflow.serve.errors import (
    APIError,
    ServeConfigError,
    error_body,
    error_response,
    install_error_handlers,
)
from arenaflow.serve.loading import (
    ModelSpec,
    ServedModel,
    describe_engine,
    load_engine,
    model_aliases,
    model_specs,
    resolve_served_model,
)
from arenaflow.serve.memory import MemoryPlan, check_memory, plan_memory
from arenaflow.serve.metrics import ServeMetrics, batch_sampler
from arenaflow.serve.schemas import ChatCompletionRequest, CompletionRequest
from arenaflow.serve.slots import ModelSlot
from arenaflow.serve.streams import merge_streams, sse_event

log = logging.getLogger(__name__)

ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/ready",
    "/metrics",
)


@dataclass
class ServeState:
    """What the app holds: one `ModelSlot` per served model (config order) once the lifespan started."""

    cfg: DictConfig
    metrics: ServeMetrics
    api_keys: list[str]
    specs: list[ModelSpec] = field(default_factory=list)
    models: dict[str, ModelSlot] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # other ids a client may send -> name
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

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each model's scheduler stats (queue depth, running rows, counters), by name."""
        return {name: s.scheduler.stats() for name, s in list(self.models.items())}

    # the first (or only) model, for single-model callers
    @property
    def served(self) -> ServedModel | None:
        return next(iter(self.models.values())).served if self.models else None

    @property
    def engine(self) -> Engine | None:
        return next(iter(self.models.values())).engine if self.models else None

    @property
    def scheduler(self) -> Scheduler | None:
        return next(iter(self.models.values())).scheduler if self.models else None


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def allowed_hosts(serve: DictConfig) -> list[str]:
    """`Host` values the server answers: serve.allowed_hosts (default the local names) + serve.host."""
    hosts = [str(h) for h in (serve.get("allowed_hosts") or LOCAL_HOSTS)]
    bind = str(serve.get("host") or "")
    if bind not in WILDCARD_BINDS and bind not in hosts:
        hosts.append(bind)
    return hosts


def key_matches(header: str, keys: list[str]) -> bool:
    """Whether an `Authorization` header carries one of `keys` (constant-time, any bytes)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    # Starlette decodes headers as latin-1; compare bytes so non-ASCII input cannot raise
    sent = token.strip().encode("latin-1", errors="replace")
    return any(hmac.compare_digest(sent, k.encode("utf-8")) for k in keys)


def api_keys_from_cfg(cfg: DictConfig) -> list[str]:
    """Keys from `serve.api_keys` plus the comma-separated `$<serve.api_keys_env>`."""
    keys = [str(k) for k in (cfg.serve.get("api_keys") or []) if str(k)]
    env_name = cfg.serve.get("api_keys_env")
    if env_name:
        keys += [k.strip() for k in os.environ.get(str(env_name), "").split(",") if k.strip()]
    return keys


def create_app(
    cfg: DictConfig,
    *,
    engine: Engine | None = None,
    served: ServedModel | None = None,
    engines: dict[str, Engine] | None = None,
    served_models: dict[str, ServedModel] | None = None,
) -> FastAPI:
    """The app for `cfg.serve`; the models load in its lifespan (before /ready answers 200).

    Pre-loaded engines skip loading: `engine` (+ `served`) for the single-model case, `engines`
    (served name -> engine) for any of `serve.models`; `served_models` are already resolved
    cards (what `preflight` returns). A bad `serve.models` (duplicate names, missing fields)
    raises ServeConfigError here; a set that does not fit in memory raises ModelsDoNotFitError
    in the lifespan, before any weights load.
    """
    specs = model_specs(cfg)
    preloaded = dict(engines or {})
    if engine is not None:
        preloaded.setdefault(specs[0].name, engine)
    unknown = sorted(set(preloaded) - {s.name for s in specs})
    if unknown:
        raise ServeConfigError(
            f"engines given for {unknown}, which are not served models "
            f"(serve.models names: {[s.name for s in specs]})"
        )
    state = ServeState(cfg=cfg, metrics=ServeMetrics(lambda: state.stats()), api_keys=[])
    state.api_keys = api_keys_from_cfg(cfg)
    state.specs = specs
    explicit_aliases = model_aliases(cfg, specs)  # serve.aliases
    state.aliases = dict(explicit_aliases)  # they win over the automatic ones (URIs, versions)

    def alias_card(alias: str) -> dict[str, Any]:
        """The card of an alias from serve.aliases: its model's card under the alias's id."""
        target = explicit_aliases[alias]
        return {**state.models[target].served.card, "id": alias, "parent": target}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        resolved = dict(served_models or {})
        if served is not None:
            resolved.setdefault(specs[0].name, served)
        for spec in specs:
            if spec.name not in resolved:
                resolved[spec.name] = await asyncio.to_thread(resolve_served_model, cfg, spec)
        paths = {spec.name: resolved[spec.name].path for spec in specs}
        state.memory = await asyncio.to_thread(plan_memory, cfg, paths, set(preloaded))
        check_memory(state.memory)
        state.metrics.set_memory(state.memory)
        for spec in specs:
            sm = resolved[spec.name]
            eng = preloaded.get(spec.name) or await asyncio.to_thread(load_engine, cfg, sm)
            describe_engine(sm, eng)
            scheduler = Scheduler(
                eng,
                max_batch_size=int(cfg.serve.max_batch_size),
                max_queue=int(cfg.serve.max_queue),
            )
            state.add(ModelSlot(name=spec.name, served=sm, engine=eng, scheduler=scheduler))
        try:
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
    app.include_router(arena_router(state))  # GET /arena and its API (serve.arena)
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(cfg.serve.max_body_bytes))
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)  # counts 413s
    app.add_middleware(  # outermost: a foreign Host is refused before anything runs
        TrustedHostMiddleware, allowed_hosts=allowed_hosts(cfg.serve), www_redirect=False
    )
    public_status = bool(cfg.serve.get("public_metrics", False))

    def has_key(request: Request) -> bool:
        return not state.api_keys or key_matches(
            request.headers.get("authorization", ""), state.api_keys
        )

    async def require_key(request: Request) -> None:
        if has_key(request):
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' (serve.api_keys)",
                code="invalid_api_key",
            )
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not (public_status or has_key(request)):  # load balancers see only the status
            return JSONResponse({"status": "ready"})
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
        return JSONResponse(
            {
                "status": "ready",
                "model": first["id"],
                "version": first.get("version"),
                "models": models,
                "memory": memory,
            }
        )

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not public_status:
            await require_key(request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models() -> dict[str, Any]:
        if not state.ready:
            raise APIError(503, "the models are still loading; retry when /ready answers 200")
        cards = [s.served.card for s in state.models.values()]
        return {"object": "list", "data": cards + [alias_card(a) for a in explicit_aliases]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(require_key)])
    async def get_model(model: str) -> dict[str, Any]:
        card = state.slot(model).served.card  # 503 while loading, 404 for an unknown id
        return alias_card(model) if model in explicit_aliases else card

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_request(state.cfg.serve, body, rows=body.n)
        limit_messages(state.cfg.serve, body)
        slot = state.slot(body.model)
        eng = slot.engine
        try:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from e
        try:
            prompt = eng.render_chat(messages)
        except Exception as e:  # a template that rejects the role order (e.g. two system turns)
            raise APIError(
                400,
                f"messages cannot be rendered with the model's chat template: {e}",
                param="messages",
                code="invalid_value",
            ) from e
        params = sampling_params(state, eng, body, prompt, logprobs=body.logprobs)
        params.top_logprobs = body.top_logprobs or 0
        gen = _Generation(state, slot, "/v1/chat/completions", "chatcmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await gen.stream([prompt], params, chat=True, include_usage=include_usage)
        results = await gen.run([prompt], params, request)
        return gen.chat_body(results[0])

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = body.prompt_list()
        check_request(state.cfg.serve, body, rows=len(prompts) * body.n)
        total = sum(len(p) for p in prompts)
        if total > int(state.cfg.serve.max_input_chars):
            raise _too_much("prompt", f"{total} characters", state.cfg.serve.max_input_chars)
        slot = state.slot(body.model)
        eng = slot.engine
        plist = [
            sampling_params(state, eng, body, p, logprobs=body.logprobs is not None, param="prompt")
            for p in prompts
        ]
        for p in plist:
            p.top_logprobs = body.logprobs or 0
        gen = _Generation(state, slot, "/v1/completions", "cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await gen.stream(prompts, plist, chat=False, include_usage=include_usage)
        return gen.completion_body(await gen.run(prompts, plist, request), body.n)

    return app


def _too_much(param: str, got: str, limit: Any, setting: str = "") -> APIError:
    where = f" (serve.{setting})" if setting else ""
    return APIError(
        400,
        f"{param} is too large: {got}, this server accepts at most {limit}{where}",
        param=param,
        code="request_too_large",
    )


def check_request(
    serve: DictConfig, body: ChatCompletionRequest | CompletionRequest, rows: int
) -> None:
    """Refuse what this server does not implement and requests bigger than one batch."""
    field_name = body.unsupported()
    if field_name is not None:
        raise APIError(
            400,
            f"{field_name} is not supported by this server; leave it out (or send its default)",
            param=field_name,
            code="unsupported_parameter",
        )
    if body.n > int(serve.max_n):
        raise APIError(
            400,
            f"n must be <= {serve.max_n} on this server (serve.max_n), got {body.n}",
            param="n",
            code="request_too_large",
        )
    if rows > int(serve.max_batch_size):  # the memory plan holds max_batch_size rows
        raise _too_much(
            "n" if rows == body.n else "prompt",
            f"{rows} rows (prompts x n)",
            f"{serve.max_batch_size} rows",
            "max_batch_size",
        )


def limit_messages(serve: DictConfig, body: ChatCompletionRequest) -> None:
    if len(body.messages) > int(serve.max_messages):
        raise _too_much(
            "messages", f"{len(body.messages)} messages", serve.max_messages, "max_messages"
        )
    total = sum(
        len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content)
        for m in body.messages
        if m.content
    )
    if total > int(serve.max_input_chars):
        raise _too_much("messages", f"{total} characters", serve.max_input_chars, "max_input_chars")


def sampling_params(
    state: ServeState,
    engine: Engine,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: str,
    *,
    logprobs: bool,
    param: str = "messages",
) -> SamplingParams:
    """Request fields -> SamplingParams; the prompt must leave room for the completion."""
    serve = state.cfg.serve
    try:
        prompt_tokens = len(engine.encode(prompt))
    except Exception as e:  # text the tokenizer refuses is the client's, not a server fault
        raise APIError(
            400, f"the {param} cannot be tokenized: {e}", param=param, code="invalid_value"
        ) from e
    room = engine.context_length - prompt_tokens
    requested = body.requested_max_tokens()
    if room < 1:
        raise APIError(
            400,
            f"this model's context window is {engine.context_length} tokens and the prompt has "
            f"{prompt_tokens}; shorten the {param}",
            param=param,
            code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"this model's context window is {engine.context_length} tokens; the prompt has "
            f"{prompt_tokens} tokens, so max_tokens can be at most {room} (got {requested})",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_new_tokens=requested or min(int(serve.default_max_tokens), room),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        n=body.n,
        logprobs=logprobs,
    )


class _Generation:
    """One HTTP request's generation: submit to the scheduler, map errors, shape OpenAI bodies."""

    def __init__(self, state: ServeState, slot: ModelSlot, endpoint: str, prefix: str) -> None:
        self.state, self.slot, self.endpoint = state, slot, endpoint
        self.model = slot.name
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self.timeout_s = float(state.cfg.serve.request_timeout_s)
        self.deadline = time.monotonic() + self.timeout_s
        self.retry_after = str(int(state.cfg.serve.retry_after_s))

    @property
    def scheduler(self) -> Scheduler:
        return self.slot.scheduler

    def _mapped(self, aw: Awaitable[Any]) -> Awaitable[Any]:
        return _mapped(aw, self.retry_after)

    def _timed_out(self) -> APIError:
        return APIError(
            504,
            f"generation did not finish within {self.timeout_s:g} s (serve.request_timeout_s); "
            "ask for fewer tokens or retry later",
            code="timeout",
        )

    async def run(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        http: Request | None = None,
    ) -> list[GenerationResult]:
        """Every prompt's result; cancelled when the client disconnects or the time limit passes."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        tasks = [
            asyncio.ensure_future(self._mapped(self.scheduler.submit(p, sp)))
            for p, sp in zip(prompts, plist, strict=True)
        ]
        everything = asyncio.ensure_future(asyncio.gather(*tasks))
        gone = asyncio.ensure_future(_disconnected(http)) if http is not None else None
        try:
            done, _ = await asyncio.wait(
                {everything} | ({gone} if gone else set()),
                timeout=max(0.0, self.deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if everything not in done:
                if gone is not None and gone in done:  # nobody will read the answer
                    raise APIError(499, "the client closed the request", code="client_closed")
                raise self._timed_out()
            results = everything.result()
        finally:
            for t in [*tasks, everything, *([gone] if gone else [])]:
                t.cancel()
        # without streaming the first token reaches the client with the whole answer
        self.state.metrics.ttft.labels(self.endpoint, self.model).observe(
            time.perf_counter() - self.t0
        )
        for r in results:
            self.state.metrics.observe_usage(self.model, r.prompt_tokens, r.completion_tokens)
        return results

    # -- bodies --------------------------------------------------------------------------------
    def chat_body(self, result: GenerationResult) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.state.fingerprint,
            "choices": choices,
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }

    def completion_body(self, results: list[GenerationResult], n: int) -> dict[str, Any]:
        choices = []
        for i, result in enumerate(results):
            for c in result.choices:
                choices.append(
                    {
                        "index": i * n + c.index,
                        "text": c.text,
                        "logprobs": _legacy_logprobs(c.logprobs)
                        if c.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.state.fingerprint,
            "choices": choices,
            "usage": _usage(
                sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
            ),
        }

    # -- streaming -----------------------------------------------------------------------------
    async def stream(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        *,
        chat: bool,
        include_usage: bool,
    ) -> StreamingResponse:
        """Open every prompt's stream first, so queue-full and bad prompts still get a status code."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        opened: list[tuple[AsyncIterator[StreamEvent], StreamEvent]] = []
        try:
            for p, sp in zip(prompts, plist, strict=True):
                it = self.scheduler.stream(p, sp).__aiter__()
                try:
                    first = await self._next(it)
                except BaseException:
                    await it.aclose()  # type: ignore[attr-defined]
                    raise
                opened.append((it, first))
        except BaseException:
            for it, _ in opened:
                await it.aclose()  # type: ignore[attr-defined]
            raise
        n = plist[0].n
        body = self._sse(opened, n, chat=chat, include_usage=include_usage)
        return StreamingResponse(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _sse(
        self,
        opened: list[tuple[AsyncIterator[StreamEvent], StreamEvent]],
        n: int,
        *,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        stream = merge_streams(opened).__aiter__()
        prompt_tokens = completion_tokens = 0
        extra = {"usage": None} if include_usage else {}
        try:
            if chat:
                for j in range(n):
                    yield sse_event(
                        self._chunk(
                            [
                                {
                                    "index": j,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                            extra,
                        )
                    )
            while True:
                try:
                    i, item = await self._next(stream)
                except StopAsyncIteration:
                    break
                except APIError as e:  # the time limit passed mid-stream
                    yield sse_event(error_body(e.status, e.message, code=e.code))
                    return
                if isinstance(item, Exception):
                    log.error("stream failed: %s", item)
                    yield sse_event(error_body(500, f"generation failed: {item}"))
                    return
                ev: StreamEvent = item
                if self.first_token_at is None and ev.token_id is not None:
                    self.first_token_at = time.perf_counter()
                    self.state.metrics.ttft.labels(self.endpoint, self.model).observe(
                        self.first_token_at - self.t0
                    )
                if ev.prompt_tokens is not None:
                    prompt_tokens += ev.prompt_tokens
                    completion_tokens += ev.completion_tokens or 0
                if ev.text or ev.logprob is not None or ev.finish_reason:
                    index = ev.index if chat else i * n + ev.index
                    yield sse_event(self._chunk([self._choice_delta(ev, index, chat)], extra))
            self.state.metrics.observe_usage(self.model, prompt_tokens, completion_tokens)
            if include_usage:
                yield sse_event(
                    self._chunk([], {"usage": _usage(prompt_tokens, completion_tokens)})
                )
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()

    async def _next(self, it: AsyncIterator[Any]) -> Any:
        """The iterator's next item within the request's time limit (APIError 504 after it)."""
        try:
            return await asyncio.wait_for(
                self._mapped(it.__anext__()), max(0.0, self.deadline - time.monotonic())
            )
        except TimeoutError:
            raise self._timed_out() from None

    def _chunk(self, choices: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk"
            if self.id.startswith("chatcmpl")
            else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.state.fingerprint,
            "choices": choices,
            **extra,
        }

    @staticmethod
    def _choice_delta(ev: StreamEvent, index: int, chat: bool) -> dict[str, Any]:
        lps = [ev.logprob] if ev.logprob is not None else None
        if chat:
            return {
                "index": index,
                "delta": {"content": ev.text} if ev.text else {},
                "logprobs": _chat_logprobs(lps) if lps else None,
                "finish_reason": ev.finish_reason,
            }
        return {
            "index": index,
            "text": ev.text,
            "logprobs": _legacy_logprobs(lps) if lps else None,
            "finish_reason": ev.finish_reason,
        }


async def _disconnected(http: Request) -> None:
    """Returns when the client has gone (the ASGI server sends `http.disconnect`)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _mapped(aw: Awaitable[Any], retry_after: str) -> Any:
    """Scheduler errors -> HTTP errors (429 with Retry-After, 400 for prompts, 503 when closing)."""
    try:
        return await aw
    except QueueFullError as e:
        raise APIError(429, f"{e}", code="queue_full", headers={"Retry-After": retry_after}) from e
    except RequestFailedError as e:
        raise APIError(500, str(e), code="generation_failed") from e
    except PromptTooLongError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from e
    except RuntimeError as e:
        raise APIError(503, f"the server could not finish the request: {e}") from e


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": _bytes(lp.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)}
                    for t in lp.top
                ],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def _legacy_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    offsets, pos = [], 0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


# -- ASGI middleware ------------------------------------------------------------------------------
Scope = dict[str, Any]
ASGIApp = Callable[..., Awaitable[None]]


class BodyLimitMiddleware:
    """413 for a request body above `max_bytes` (Content-Length or counted while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Any, send: Any) -> None:
        response = error_response(
            413,
            f"request body is larger than {self.max_bytes} bytes (serve.max_body_bytes); send less",
            code="request_too_large",
        )
        await response(scope, receive, send)


class RequestMetricsMiddleware:
    """Counts requests by endpoint and status and times them until their last body byte."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        t0 = time.perf_counter()
        status = {"code": 500}

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            if endpoint.startswith("/v1/"):
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
