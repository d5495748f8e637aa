"""Judge backends behind one small interface: the OpenAI API, any OpenAI-compatible server, and
the arenaflow engine in process.

A backend turns (system, user) chats into replies (under the verdict's JSON schema when the chat
carries one: OpenAI's `response_format`, the engine's grammar) and, where it can see token
probabilities, reads the judge's distribution over verdict tokens after a forced `[[` prefix. The
HTTP, retries, backoff and concurrency are the shared `arenaflow.clients.EndpointClient`; caching
and budgets live in the runner, which is backend-agnostic: it hands a backend a `CallGate` that
every request (retries included) must pass before it is sent, and an `on_result` callback that
sees each reply the moment it returns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from arenaflow.clients.budget import NO_BUDGET, BudgetRefusedError, CallGate
from arenaflow.clients.endpoint import (
    EndpointAuthError,
    EndpointClient,
    EndpointModelError,
    EndpointUnreachableError,
    UnreadableReplyError,
    describe,
)
from arenaflow.judge.verdicts import PAIR_TOKENS, RATING_TOKENS, TokenTop

log = logging.getLogger(__name__)

VERDICT_PREFIX = {"[[rating]]": "\n\nRating: [[", "[[A]]": "\n\nFinal verdict: [["}
STRUCTURED_REFUSED = (
    "judge.structured=true sends response_format json_schema; a server without structured "
    "outputs refuses it: set judge.structured=false"
)
VERDICT_FOLLOW_UP = {
    "[[rating]]": 'Give only your final rating in the format "[[rating]]", for example: [[5]].',
    "[[A]]": 'Give only your final verdict in the format "[[A]]", "[[B]]" or "[[C]]".',
}


class JudgeConfigError(ValueError):
    """A judge setting the user must fix (missing API key, unknown backend, bad baseline)."""


class JudgeUnreachableError(RuntimeError):
    """The judge server cannot be reached at all; judging stops with the URL in the message."""


T = TypeVar("T")


@dataclass
class ChatRequest:
    system: str
    user: str
    schema: dict[str, Any] | None = None  # a structured verdict's JSON schema (judge.structured)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


@dataclass
class Completion:
    """One judge reply; `text` is None and `error` says why when the call failed for good."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    attempts: int = 1
    tokens: list[TokenTop] | None = None  # per generated token: (text, alternatives' logprobs)


@dataclass
class Recovery:
    """One verdict-only follow-up: the verdict token's top logprobs, or None (unseen or `error`)."""

    top: dict[str, float] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    error: str | None = None  # the call failed or the budget refused it: worth another try later


OnResult = Callable[[int, T], None]  # (index of the request, its reply) as each one returns


class JudgeBackend:
    """The interface every judge implements."""

    model_name: str = "judge"
    supports_logprobs: bool = False
    batch_size: int = 1  # how many requests the runner hands over at once

    def complete(
        self,
        requests: list[ChatRequest],
        *,
        gate: CallGate = NO_BUDGET,
        on_result: OnResult[Completion] | None = None,
    ) -> list[Completion]:
        raise NotImplementedError

    def verdict_logprobs(
        self,
        requests: list[ChatRequest],
        judgments: list[str],
        output_format: str,
        *,
        gate: CallGate = NO_BUDGET,
        on_result: OnResult[Recovery] | None = None,
    ) -> list[Recovery]:
        """Top logprobs (token -> logprob) of the verdict token, per request; None where unseen."""
        out = [Recovery(None, attempts=0) for _ in requests]
        for i, r in enumerate(out):
            if on_result is not None:
                on_result(i, r)
        return out

    def close(self) -> None: ...


class OpenAIBackend(JudgeBackend):
    """The official `openai` client against api.openai.com or any OpenAI-compatible `base_url`,
    through `EndpointClient` (retries of 429 / 5xx / timeouts honouring a capped `Retry-After`).
    A server that cannot be reached at all raises `JudgeUnreachableError` naming the URL instead
    of failing every item one by one."""

    def __init__(
        self,
        model: str,
        *,
        model_name: str | None = None,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int = 2048,
        concurrency: int = 8,
        retries: int = 3,
        timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        logprobs: bool = False,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise JudgeConfigError(
                    f"the judge {model!r} needs an API key in the environment variable "
                    f"{api_key_env}, which is not set; export {api_key_env}=... "
                    "(it is read from the environment only and never logged or written)"
                )
        self.model = model
        self.model_name = model_name or model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.retries = retries
        self.batch_size = max(1, concurrency)
        self.supports_logprobs = logprobs
        self.client = EndpointClient(
            base_url,
            model,
            api_key=api_key,
            timeout=timeout,
            retries=retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            concurrency=self.batch_size,
            **({"sleep": sleep} if sleep is not None else {}),
        )
        self.url = self.client.url

    def _call(self, gate: CallGate, **kwargs: Any) -> tuple[Any, int]:
        """One chat completion with retries (EndpointClient.chat), in the judge's words."""
        try:
            return self.client.chat(gate, **kwargs)
        except EndpointUnreachableError as e:
            raise JudgeUnreachableError(
                f"the judge server at {self.url} is unreachable ({e.__cause__ or e}); "
                "check judge.base_url and that the server is running"
            ) from e
        except EndpointAuthError as e:
            raise JudgeConfigError(
                f"the judge server at {self.url} rejected the API key (401); check the key in "
                "the environment variable named by judge.api_key_env"
            ) from e
        except EndpointModelError as e:
            raise JudgeConfigError(
                f"the judge server at {self.url} does not know model {self.model!r} (404); "
                "check judge.model"
            ) from e

    def _complete_one(self, request: ChatRequest, gate: CallGate) -> Completion:
        import openai

        # With logprobs on, the reply carries the verdict token's alternatives at no extra cost.
        extra: dict[str, Any] = (
            {"logprobs": True, "top_logprobs": 20} if self.supports_logprobs else {}
        )
        if request.schema is not None:
            extra["response_format"] = response_format(request.schema)
        try:
            response, attempts = self._call(
                gate,
                messages=request.messages(),
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                **extra,
            )
        except BudgetRefusedError as e:
            return Completion(text=None, error=f"budget: {e.reason}", attempts=e.attempts)
        except (openai.APIStatusError, openai.APITimeoutError, UnreadableReplyError) as e:
            attempts = getattr(e, "arenaflow_attempts", self.retries + 1)
            error = describe(e)
            if request.schema is not None and getattr(e, "status_code", None) == 400:
                error += f" ({STRUCTURED_REFUSED})"
            return Completion(text=None, error=error, attempts=attempts)
        usage = response.usage
        content = getattr(response.choices[0].logprobs, "content", None)
        return Completion(
            text=response.choices[0].message.content or "",
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            attempts=attempts,
            tokens=[_alternatives(p) for p in content] if content else None,
        )

    def complete(
        self,
        requests: list[ChatRequest],
        *,
        gate: CallGate = NO_BUDGET,
        on_result: OnResult[Completion] | None = None,
    ) -> list[Completion]:
        return self.client.map(self._complete_one, [(r, gate) for r in requests], on_result)

    def _logprobs_one(
        self, request: ChatRequest, judgment: str, output_format: str, gate: CallGate
    ) -> Recovery:
        """A follow-up call that asks for the verdict only, read from its top logprobs."""
        import openai

        wanted = set(RATING_TOKENS if output_format == "[[rating]]" else PAIR_TOKENS)
        messages = [
            *request.messages(),
            {"role": "assistant", "content": judgment},
            {"role": "user", "content": VERDICT_FOLLOW_UP[output_format]},
        ]
        try:
            response, attempts = self._call(
                gate,
                messages=messages,
                temperature=0.0,
                max_tokens=5,
                logprobs=True,
                top_logprobs=20,
            )
        except BudgetRefusedError as e:
            return Recovery(None, attempts=e.attempts, error=f"budget: {e.reason}")
        except (openai.APIStatusError, openai.APITimeoutError, UnreadableReplyError) as e:
            log.warning("logprob recovery call failed: %s", describe(e))
            attempts = getattr(e, "arenaflow_attempts", self.retries + 1)
            return Recovery(None, attempts=attempts, error=describe(e))
        usage = response.usage
        out = Recovery(
            None,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            attempts=attempts,
        )
        content = getattr(response.choices[0].logprobs, "content", None) or []
        for position in content:
            _, top = _alternatives(position)
            if any(t.strip() in wanted for t in top):
                out.top = dict(top)
                break
        return out

    def verdict_logprobs(
        self,
        requests: list[ChatRequest],
        judgments: list[str],
        output_format: str,
        *,
        gate: CallGate = NO_BUDGET,
        on_result: OnResult[Recovery] | None = None,
    ) -> list[Recovery]:
        args = [(r, j, output_format, gate) for r, j in zip(requests, judgments, strict=True)]
        return self.client.map(self._logprobs_one, args, on_result)

    def close(self) -> None:
        self.client.close()


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's structured-output request for a verdict schema (strict: the reply must match)."""
    name = str(schema.get("title") or "verdict")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _alternatives(position: Any) -> TokenTop:
    """One position of an OpenAI logprobs reply: its token and the alternatives' logprobs."""
    top = {t.token: t.logprob for t in (position.top_logprobs or [])}
    top.setdefault(position.token, position.logprob)
    return position.token, top


def build_backend(cfg: DictConfig, base_model_path: str | Path | None = None) -> JudgeBackend:
    """The judge named by `cfg.judge.backend` (openai | openai_compatible | local)."""
    j = cfg.judge
    if j.backend in ("openai", "openai_compatible"):
        if j.backend == "openai_compatible" and not j.get("base_url"):
            raise JudgeConfigError(
                "judge=openai_compatible needs judge.base_url=http://host:port/v1"
            )
        return OpenAIBackend(
            str(j.model),
            model_name=str(j.model_name),
            base_url=j.get("base_url"),
            api_key_env=j.get("api_key_env"),
            temperature=float(j.temperature),
            max_tokens=int(j.max_tokens),
            concurrency=int(j.concurrency),
            retries=int(j.retries),
            timeout=float(j.timeout),
            backoff_base=float(j.backoff_base),
            backoff_max=float(j.backoff_max),
            logprobs=bool(j.logprob_recovery),
        )
    if j.backend == "local":
        from arenaflow.engine.backends import load_engine
        from arenaflow.judge.local import LocalBackend, judge_engine_spec, resolve_judge_checkpoint

        checkpoint = resolve_judge_checkpoint(cfg, base_model_path)
        tracking_uri = cfg.tracking.tracking_uri if cfg.tracking.enabled else None
        engine = load_engine(checkpoint, judge_engine_spec(cfg), tracking_uri=tracking_uri)

        return LocalBackend(
            engine,
            model_name=str(j.model_name),
            temperature=float(j.temperature),
            max_tokens=int(j.max_tokens),
            batch_size=int(j.batch_size),
        )
    raise JudgeConfigError(
        f"unknown judge.backend {j.backend!r}; use openai, openai_compatible or local "
        "(conf/judge/gpt4.yaml, openai_compatible.yaml, local.yaml)"
    )
