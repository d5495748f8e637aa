"""The OpenAI routes: /v1/models, /v1/chat/completions and /v1/completions.

Each request is checked before it reaches a queue (unsupported fields, rows = prompts x n against
one batch, messages and characters, the context window), then turned into prompts + SamplingParams
for a `Generation`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from omegaconf import DictConfig

from arenaflow.engine import Constraint, Engine, InvalidConstraintError, SamplingParams
from arenaflow.engine.penalties import check_token_ids
from arenaflow.serve.errors import APIError
from arenaflow.serve.generation import Generation
from arenaflow.serve.responses import ModelCard, ModelList
from arenaflow.serve.schemas import ChatCompletionRequest, CompletionRequest
from arenaflow.serve.security import KeyCheck
from arenaflow.serve.slots import ServeState
from arenaflow.serve.tools import ToolPlan, check_tools, render_chat, tool_chars
from arenaflow.serve.upstream import forward, is_upstream


def openai_router(state: ServeState, keys: KeyCheck) -> APIRouter:
    router = APIRouter(dependencies=[Depends(keys.require)])
    serve = state.cfg.serve

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        if not state.ready:
            raise APIError(503, "the models are still loading; retry when /ready answers 200")
        names = [*state.models, *state.explicit_aliases]
        return ModelList(data=[ModelCard(**state.card(n)) for n in names]).model_dump()

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        state.slot(model)  # 503 while loading, 404 for an unknown id
        return state.card(model)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_request(serve, body, rows=body.n)
        check_messages(serve, body)
        check_tools(body)
        slot = state.slot(body.model)
        if is_upstream(slot):  # an engine process serves it (serve/upstream.py)
            return await forward(state, slot, "/v1/chat/completions", request, _include_usage(body))
        tools = ToolPlan.of(body)
        prompt = render(slot.engine, body, tools)
        params = sampling_params(serve, slot.engine, body, prompt, logprobs=body.logprobs)
        params.top_logprobs = body.top_logprobs or 0
        if tools is not None:  # a forced call is decoded under its grammar
            params.constraint = tools.checked_constraint(slot.engine) or params.constraint
            params.stop += tools.stops()
        gen = Generation(state, slot, "/v1/chat/completions", chat=True, tools=tools)
        if body.stream:
            return await gen.stream([prompt], [params], _include_usage(body))
        results = await gen.run([prompt], [params], request)
        return gen.body.chat(results[0], tools)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = body.prompt_list()
        check_request(serve, body, rows=len(prompts) * body.n)
        total = sum(len(p) for p in prompts)
        if total > int(serve.max_input_chars):
            raise too_much(
                "prompt", f"{total} characters", serve.max_input_chars, "max_input_chars"
            )
        slot = state.slot(body.model)
        if is_upstream(slot):  # an engine process serves it (serve/upstream.py)
            return await forward(state, slot, "/v1/completions", request, _include_usage(body))
        plist = [
            sampling_params(
                serve, slot.engine, body, p, logprobs=body.logprobs is not None, param="prompt"
            )
            for p in prompts
        ]
        for p in plist:
            p.top_logprobs = body.logprobs or 0
        gen = Generation(state, slot, "/v1/completions", chat=False)
        if body.stream:
            return await gen.stream(prompts, plist, _include_usage(body))
        return gen.body.text(await gen.run(prompts, plist, request), body.n)

    return router


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def too_much(param: str, got: str, limit: Any, setting: str) -> APIError:
    return APIError(
        400,
        f"{param} is too large: {got}, this server accepts at most {limit} (serve.{setting})",
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
        raise too_much(
            "n" if rows == body.n else "prompt",
            f"{rows} rows (prompts x n)",
            f"{serve.max_batch_size} rows",
            "max_batch_size",
        )


def check_messages(serve: DictConfig, body: ChatCompletionRequest) -> None:
    if len(body.messages) > int(serve.max_messages):
        raise too_much(
            "messages", f"{len(body.messages)} messages", serve.max_messages, "max_messages"
        )
    total = sum(
        len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content)
        for m in body.messages
        if m.content
    )
    total += tool_chars(body)
    if total > int(serve.max_input_chars):
        raise too_much("messages", f"{total} characters", serve.max_input_chars, "max_input_chars")


def render(engine: Engine, body: ChatCompletionRequest, tools: ToolPlan | None = None) -> str:
    """The chat prompt in the model's own template (`developer` is a system turn), with tools."""
    try:
        for m in body.messages:
            m.text()
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from e
    try:
        return render_chat(engine.tokenizer, body.messages, tools)
    except Exception as e:  # a template that rejects the role order (e.g. two system turns)
        raise APIError(
            400,
            f"messages cannot be rendered with the model's chat template: {e}",
            param="messages",
            code="invalid_value",
        ) from e


def sampling_params(
    serve: DictConfig,
    engine: Engine,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: str,
    *,
    logprobs: bool,
    param: str = "messages",
) -> SamplingParams:
    """Request fields -> SamplingParams; the prompt must leave room for the completion."""
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
    params = SamplingParams(
        max_new_tokens=requested or min(int(serve.default_max_tokens), room),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
        n=body.n,
        logprobs=logprobs,
        constraint=response_constraint(engine, body),
        **body.penalties(),
    )
    try:
        check_token_ids(params, len(engine.tokenizer))
    except ValueError as e:
        raise APIError(400, str(e), param="logit_bias", code="invalid_value") from e
    return params


def response_constraint(
    engine: Engine, body: ChatCompletionRequest | CompletionRequest
) -> Constraint | None:
    """`response_format` as a constraint, compiled here (then cached) so a schema the grammar
    library refuses is a 400 naming `response_format` before anything is queued."""
    constraint = body.response_format.constraint() if body.response_format else None
    if constraint is not None:
        try:
            engine.constraints.compile(constraint)
        except InvalidConstraintError as e:
            raise APIError(400, str(e), param="response_format", code="invalid_value") from e
    return constraint
