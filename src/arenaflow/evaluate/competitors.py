"""Competitors: who answers MT-bench. One small backend interface, a local engine or a remote OpenAI-style API.

`conf/eval/*.yaml` lists competitors as `name` + `local` (finetuned | base | checkpoint folder |
models:/ URI) or `openai_compatible` (base_url, model, api_key_env). A backend turns a batch of chats
into turn outputs; a failure is an output with an error, never an exception that loses the batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from arenaflow.engine import Engine, SamplingParams

log = logging.getLogger(__name__)

UPSTREAM_REFS = ("finetuned", "base")  # resolved from the pipeline's model assets


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
    """Validate `eval.competitors`; a bad entry raises ValueError naming it and the fix."""
    items = (
        OmegaConf.to_container(entries, resolve=True)
        if isinstance(entries, DictConfig | ListConfig)
        else entries
    )
    if not isinstance(items, list) or not items:
        raise ValueError(
            "eval.competitors must be a non-empty list of {name, local | openai_compatible}"
        )
    out, names = [], set()
    for i, e in enumerate(items):
        where = f"eval.competitors[{i}]"
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
    competitors = parse_competitors(cfg.eval.competitors)
    for c in competitors:
        if c.name == name:
            return c
    raise ValueError(
        f"no competitor named {name!r} in eval.competitors (have {[c.name for c in competitors]})"
    )


def folder_fingerprint(path: str | Path) -> str:
    """Identity of a checkpoint folder's weights and tokenizer, cheap (names, sizes, mtimes)."""
    p = Path(path)
    parts = []
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model", ".jinja")):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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


class LocalBackend(Backend):
    """The arenaflow engine over a checkpoint folder or MLflow URI, loaded on first use."""

    def __init__(
        self,
        ref: str,
        *,
        tracking_uri: str | None,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 8,
    ) -> None:
        self.ref, self.tracking_uri = ref, tracking_uri
        self.dtype, self.device, self.batch_size = dtype, device, batch_size
        self._engine: Engine | None = None
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        if self.ref.startswith("models:/"):
            from arenaflow.tracking import MlflowTracker, parse_models_uri

            if not self.tracking_uri:
                raise ValueError(f"{self.ref} needs MLflow tracking (tracking.enabled=true)")
            name, version, alias = parse_models_uri(self.ref)
            info = MlflowTracker(self.tracking_uri, "arenaflow").get_version(
                name, alias=alias, version=version
            )
            if info is None:
                raise ValueError(f"MLflow registry has no model {self.ref} ({self.tracking_uri})")
            return f"{info.name}/{info.version}/{info.run_id}"
        from arenaflow.engine import resolve_checkpoint

        return folder_fingerprint(resolve_checkpoint(self.ref))

    def prepare(self) -> None:
        _ = self.engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine.load(
                self.ref,
                dtype=self.dtype,
                device=self.device,
                tracking_uri=self.tracking_uri,
                max_batch_size=self.batch_size,
            )
        return self._engine

    def generate(self, chats, params, progress=None) -> list[TurnOutput]:
        engine = self.engine
        outputs: list[TurnOutput | None] = [None] * len(chats)
        requests, slots = [], []
        for i, (chat, p) in enumerate(zip(chats, params, strict=True)):
            try:
                requests.append(engine.make_request(engine.render_chat(chat), p))
                slots.append(i)
            except ValueError as e:  # PromptTooLongError, a template that refuses the chat
                outputs[i] = TurnOutput(None, error=f"{type(e).__name__}: {e}")
        step = max(1, self.batch_size * 2)
        for start in range(0, len(requests), step):
            chunk = requests[start : start + step]
            engine.run_requests(chunk)
            for j, r in enumerate(chunk):
                res = r.build_result()
                outputs[slots[start + j]] = TurnOutput(res.choices[0].text, res.completion_tokens)
            if progress:
                progress(len(chunk))
        return [o if o is not None else TurnOutput(None, error="not generated") for o in outputs]


class OpenAICompatibleBackend(Backend):
    """Any OpenAI-style /v1/chat/completions server (OpenAI, vLLM, an arenaflow endpoint), with retries."""

    def __init__(
        self,
        competitor: Competitor,
        *,
        retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 120.0,
        concurrency: int = 4,
    ) -> None:
        import openai

        key = "EMPTY"
        if competitor.api_key_env:
            key = os.environ.get(competitor.api_key_env, "")
            if not key:
                raise ValueError(
                    f"competitor {competitor.name!r}: environment variable "
                    f"{competitor.api_key_env} is empty; export it before running"
                )
        self.competitor = competitor
        self.client = openai.OpenAI(
            base_url=competitor.base_url, api_key=key, max_retries=0, timeout=timeout_s
        )
        self.retries, self.backoff_s, self.concurrency = max(1, retries), backoff_s, concurrency
        self.fingerprint = f"{competitor.base_url}|{competitor.model}"

    def _one(self, chat: list[dict[str, str]], p: SamplingParams) -> TurnOutput:
        import openai

        error = ""
        for attempt in range(self.retries):
            try:
                resp = self.client.chat.completions.create(
                    model=self.competitor.model,
                    messages=chat,
                    temperature=p.temperature,
                    max_tokens=p.max_new_tokens,
                    seed=p.seed,
                )
                text = resp.choices[0].message.content
                if text is None:
                    raise ValueError("response has no message content")
                tokens = resp.usage.completion_tokens if resp.usage else 0
                return TurnOutput(text, tokens)
            except (openai.APIError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
                if isinstance(e, openai.APIStatusError) and e.status_code in (
                    400,
                    401,
                    403,
                    404,
                    422,
                ):
                    break  # retrying cannot fix a bad request or a bad key
                if attempt + 1 < self.retries:
                    delay = self.backoff_s * 2**attempt
                    log.warning(
                        "%s: attempt %d failed (%s); retrying in %.1fs",
                        self.competitor.name,
                        attempt + 1,
                        error,
                        delay,
                    )
                    time.sleep(delay)
        return TurnOutput(None, error=error)

    def generate(self, chats, params, progress=None) -> list[TurnOutput]:
        def job(args: tuple[list[dict[str, str]], SamplingParams]) -> TurnOutput:
            out = self._one(*args)
            if progress:
                progress(1)
            return out

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(job, zip(chats, params, strict=True)))

    def close(self) -> None:
        self.client.close()


def make_backend(cfg: DictConfig, competitor: Competitor, model_ref: str | None = None) -> Backend:
    """The backend for a competitor; `model_ref` replaces `local: finetuned | base` with a real model."""
    e = cfg.eval
    if competitor.is_remote:
        return OpenAICompatibleBackend(
            competitor,
            retries=int(e.retries),
            backoff_s=float(e.get("backoff_s", 1.0)),
            timeout_s=float(e.get("request_timeout_s", 120)),
            concurrency=int(e.get("concurrency", 4)),
        )
    ref = model_ref or resolve_local_ref(cfg, competitor.local)
    tracking_uri = cfg.tracking.tracking_uri if cfg.tracking.enabled else None
    return LocalBackend(
        ref,
        tracking_uri=tracking_uri,
        dtype=str(cfg.hardware.dtype),
        device="cuda" if cfg.hardware.accelerator == "gpu" else "cpu",
        batch_size=int(e.batch_size),
    )


def resolve_local_ref(cfg: DictConfig, local: str) -> str:
    """Outside Dagster: `base` is the configured model, `finetuned` the newest registered version."""
    if local == "base":
        from arenaflow.models import resolve_model

        return str(resolve_model(cfg.model, cfg.paths.cache_dir))
    if local == "finetuned":
        from arenaflow.tracking import tracker_from_cfg

        name = cfg.tracking.get("registered_model_name", "arenaflow-chat")
        versions = tracker_from_cfg(cfg).latest_versions(name)
        if not versions:
            raise ValueError(
                f"competitor `local: finetuned` found no registered model {name!r}; run "
                "`python -m arenaflow.train` first, or set the competitor's `local` to a folder"
            )
        return f"models:/{name}/{versions[-1].version}"
    return local
