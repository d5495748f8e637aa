"""Competitors: who answers MT-bench. One small backend interface, a local engine or a remote OpenAI-style API.

`conf/evaluate/*.yaml` lists competitors as `name` + `local` (finetuned | base | checkpoint folder |
models:/ URI, resolved by `arenaflow.models.resolve_reference`) or `openai_compatible` (base_url,
model, api_key_env). A backend is a thin adapter over the shared clients (`arenaflow.clients`:
the engine in process or an OpenAI-compatible endpoint) that turns a batch of chats into turn
outputs; a failure is an output with an error, never an exception that loses the batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
from omegaconf import DictConfig, ListConfig, OmegaConf

from arenaflow.clients.endpoint import EndpointClient, EndpointError, UnreadableReplyError, describe
from arenaflow.clients.engine import EngineClient
from arenaflow.engine import SamplingParams
from arenaflow.engine.backends import EngineSpec

log = logging.getLogger(__name__)


@dataclass
class Competitor:
    name: str
    local: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.local is None


@dataclass
class TurnOutput:
    text: str | None
    completion_tokens: int = 0
    error: str | None = None


def parse_competitors(entries: Any) -> list[Competitor]:
    """Validate `evaluate.competitors`; a bad entry raises ValueError naming it and the fix."""
    items = (
        OmegaConf.to_container(entries, resolve=True)
        if isinstance(entries, DictConfig | ListConfig)
        else entries
    )
    if not isinstance(items, list) or not items:
        raise ValueError(
            "evaluate.competitors must be a non-empty list of {name, local | openai_compatible}"
        )
    out, names = [], set()
    for i, e in enumerate(items):
        where = f"evaluate.competitors[{i}]"
        if not isinstance(e, dict) or not e.get("name"):
            raise ValueError(f"{where} needs a `name`")
        name = str(e["name"])
        if name in names:
            raise ValueError(
                f"{where}: competitor name {name!r} is used twice; names must be unique"
            )
        names.add(name)
        remote = e.get("openai_compatible")
        if bool(e.get("local")) == bool(remote):
            raise ValueError(
                f"{where} ({name}) needs exactly one of `local` (finetuned | base | folder | "
                "models:/ URI) or `openai_compatible` ({base_url, model, api_key_env})"
            )
        if remote:
            missing = [k for k in ("base_url", "model") if not remote.get(k)]
            if missing:
                raise ValueError(f"{where} ({name}): openai_compatible needs {missing}")
            out.append(
                Competitor(
                    name,
                    base_url=str(remote["base_url"]),
                    model=str(remote["model"]),
                    api_key_env=remote.get("api_key_env"),
                )
            )
        else:
            out.append(Competitor(name, local=str(e["local"])))
    return out


def find_competitor(cfg: DictConfig, name: str) -> Competitor:
    competitors = parse_competitors(cfg.evaluate.competitors)
    for c in competitors:
        if c.name == name:
            return c
    raise ValueError(
        f"no competitor named {name!r} in evaluate.competitors (have {[c.name for c in competitors]})"
    )


class Backend:
    """Answers chats; `fingerprint` identifies the model so resumed answers are never stale."""

    fingerprint: str = ""

    def generate(
        self,
        chats: list[list[dict[str, str]]],
        params: list[SamplingParams],
        progress: Callable[[int], None] | None = None,
    ) -> list[TurnOutput]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Load what generation needs (so throughput timings exclude loading)."""
        return None

    def close(self) -> None:
        return None


class LocalCompetitor(Backend):
    """The arenaflow engine over a checkpoint folder or MLflow URI (`EngineClient`), loaded on first use."""

    def __init__(self, ref: str, *, tracking_uri: str | None, **engine: Any) -> None:
        from arenaflow.engine.backends import EngineSpec, engine_identity
        from arenaflow.models import model_identity

        self.client = EngineClient(ref, tracking_uri=tracking_uri, **engine)
        spec = engine.get("spec") or EngineSpec()
        self.fingerprint = f"{model_identity(ref, tracking_uri)}|{engine_identity(spec)}"

    def prepare(self) -> None:
        _ = self.client.engine

    def generate(self, chats, params, progress=None) -> list[TurnOutput]:
        return [
            TurnOutput(r.text, r.completion_tokens, r.error)
            for r in self.client.chat_batch(chats, params, progress)
        ]


class EndpointCompetitor(Backend):
    """Any OpenAI-style /v1/chat/completions server (OpenAI, vLLM, an arenaflow endpoint), through
    the shared `EndpointClient` (its retries, capped Retry-After, concurrency)."""

    def __init__(
        self,
        competitor: Competitor,
        *,
        attempts: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 120.0,
        concurrency: int = 4,
    ) -> None:
        key = None
        if competitor.api_key_env:
            key = os.environ.get(competitor.api_key_env, "")
            if not key:
                raise ValueError(
                    f"competitor {competitor.name!r}: environment variable "
                    f"{competitor.api_key_env} is empty; export it before running"
                )
        self.competitor = competitor
        self.client = EndpointClient(
            competitor.base_url,
            str(competitor.model),
            api_key=key,
            timeout=timeout_s,
            retries=max(1, attempts) - 1,
            backoff_base=backoff_s,
            concurrency=concurrency,
        )
        self.fingerprint = f"{competitor.base_url}|{competitor.model}"

    def _one(self, chat: list[dict[str, str]], p: SamplingParams) -> TurnOutput:
        try:
            resp, _ = self.client.chat(
                messages=chat, temperature=p.temperature, max_tokens=p.max_new_tokens, seed=p.seed
            )
        except (openai.APIError, EndpointError, UnreadableReplyError) as e:  # this turn's output
            return TurnOutput(None, error=describe(e))
        text = resp.choices[0].message.content
        if text is None:
            return TurnOutput(None, error="response has no message content")
        return TurnOutput(text, resp.usage.completion_tokens if resp.usage else 0)

    def generate(self, chats, params, progress=None) -> list[TurnOutput]:
        def job(chat: list[dict[str, str]], p: SamplingParams) -> TurnOutput:
            out = self._one(chat, p)
            if progress:
                progress(1)
            return out

        return self.client.map(job, list(zip(chats, params, strict=True)), None)

    def close(self) -> None:
        self.client.close()


def make_backend(cfg: DictConfig, competitor: Competitor, model_ref: str | None = None) -> Backend:
    """The backend for a competitor; `model_ref` replaces `local: finetuned | base` with a real model."""
    from arenaflow.models import resolve_reference

    e = cfg.evaluate
    if competitor.is_remote:
        return EndpointCompetitor(
            competitor,
            attempts=int(e.retries),
            backoff_s=float(e.backoff_s),
            timeout_s=float(e.request_timeout_s),
            concurrency=int(e.concurrency),
        )
    return LocalCompetitor(
        model_ref or resolve_reference(str(competitor.local), cfg),
        tracking_uri=cfg.tracking.tracking_uri if cfg.tracking.enabled else None,
        spec=EngineSpec.from_cfg(cfg),
        batch_size=int(e.batch_size),
    )
