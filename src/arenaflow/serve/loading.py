"""Resolve the served models (`serve.models`, or `serve.model_uri`) to engines and model cards.

The registry is the source of truth for what is served: a `models:/name@champion` URI is pinned to
the version the alias names at start-up, and that version's tags become the card that
`GET /v1/models` shows, so a client can see which run trained the model and how it scored. An
entry may name an adapter checkpoint (folder or registry version): its base is resolved here too,
and adapters over one base are served on one copy of it (serve/adapters.py). An entry may also be
served by an engine process (serve/upstream.py): `upstream: {url, model, api_key_env}` names one
that runs already, `engine: vllm` has the app launch `vllm serve` on the entry's checkpoint.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from arenaflow.adapters import AdapterCheckpoint
from arenaflow.engine import Engine
from arenaflow.serve.errors import ServeConfigError

log = logging.getLogger(__name__)

# version tags that are results (the rating stage writes arenaflow.rating*, arenaflow.mt_bench_score)
_RESULT_TAG = re.compile(
    r"^(arenaflow\.)?(mt_?bench|elo|bt_|bradley|rating|leaderboard|score|win|judge)", re.I
)


@dataclass
class ServedModel:
    """What the app serves: the checkpoint folder, the names clients may ask for and the card."""

    path: Path | None  # None for a model an upstream engine process serves from its own files
    names: list[str]
    card: dict[str, Any] = field(default_factory=dict)
    adapter: AdapterCheckpoint | None = None  # set when `path` is an adapter checkpoint
    base: Path | None = None  # the adapter's base checkpoint folder (downloaded, checked)


ENGINES = ("vllm",)  # `engine:` values of a serve.models entry: launched as a managed child


@dataclass(frozen=True)
class UpstreamSpec:
    """An OpenAI-compatible engine process that serves a model (vLLM's, llama.cpp's or ours)."""

    url: str  # its base URL, http://host:port/v1
    model: str  # the id it serves the model under
    api_key_env: str | None = None  # the variable holding its key (the key itself is never config)


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: the name clients ask for and where it comes from."""

    name: str
    uri: str | None  # a checkpoint folder, models:/name/3 | models:/name@alias or runs:/<id>/<path>
    origin: str  # the config entry it came from, for messages
    upstream: UpstreamSpec | None = None  # served by an engine process that runs already
    engine: str | None = None  # `vllm`: the app launches that engine process on `uri`

    @property
    def in_process(self) -> bool:
        """Whether arenaflow's own engine serves it here (not an engine process)."""
        return self.upstream is None and self.engine is None

    def entry(self) -> dict[str, Any]:
        """The `serve.models` entry that gives this spec back."""
        out: dict[str, Any] = {"name": self.name}
        if self.uri is not None:
            out["uri"] = self.uri
        if self.engine is not None:
            out["engine"] = self.engine
        if self.upstream is not None:
            out["upstream"] = {k: v for k, v in vars(self.upstream).items() if v is not None}
        return out


def model_specs(cfg: DictConfig) -> list[ModelSpec]:
    """The models to serve, in config order; bad or duplicate entries raise ServeConfigError.

    `serve.models` lists `{name, uri}`; `serve.models_from: competitors` adds the current
    evaluation's local competitors (`evaluate.competitors`); with neither, the app serves the single
    `serve.model_uri` as `serve.served_model_name`.
    """
    serve = cfg.serve
    specs: list[ModelSpec] = []
    source = serve.get("models_from")
    if source:
        if str(source) != "competitors":
            raise ServeConfigError(
                f"serve.models_from={source!r} is not supported; use `competitors` (the local "
                "models of evaluate.competitors) or null"
            )
        specs += _competitor_specs(cfg)
    entries = serve.get("models") or []
    if isinstance(entries, ListConfig):
        entries = OmegaConf.to_container(entries, resolve=True)
    if not isinstance(entries, list):
        raise ServeConfigError("serve.models must be a list of {name, uri}")
    specs += [_entry_spec(e, f"serve.models[{i}]") for i, e in enumerate(entries)]
    if not specs:
        specs = [ModelSpec(str(serve.served_model_name), str(serve.model_uri), "serve.model_uri")]
    seen: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise ServeConfigError(
                f"the model name {spec.name!r} is used twice ({seen[spec.name].origin} and "
                f"{spec.origin}); every served model needs its own name"
            )
        seen[spec.name] = spec
    return specs


def _entry_spec(e: Any, where: str) -> ModelSpec:
    """One `serve.models` entry: `{name, uri}`, `{name, uri, engine: vllm}` or `{name, upstream}`."""
    if not isinstance(e, dict) or not e.get("name") or not (e.get("uri") or e.get("upstream")):
        raise ServeConfigError(
            f"{where} must be a mapping with `name` (the id clients send as `model`) and `uri` "
            f"(a checkpoint folder or models:/name@alias | models:/name/3) or `upstream` (an "
            f"engine process: {{url, model, api_key_env}}), got {e!r}"
        )
    unknown = sorted(set(e) - {"name", "uri", "engine", "upstream"})
    if unknown:
        raise ServeConfigError(
            f"{where} has unknown keys {unknown}; it takes `name` and `uri` (with `engine`) or "
            "`upstream`"
        )
    name, engine, up = str(e["name"]), e.get("engine"), e.get("upstream")
    if up is not None:
        if e.get("uri") or engine:
            raise ServeConfigError(
                f"{where} ({name}): `upstream` names a running engine process; leave out `uri` "
                "and `engine` (those launch one)"
            )
        fields = {"url", "model", "api_key_env"}
        if not isinstance(up, dict) or not up.get("url") or not up.get("model") or set(up) - fields:
            raise ServeConfigError(
                f"{where}.upstream ({name}) must be {{url: http://host:port/v1, model: <the id "
                f"it serves>, api_key_env: <variable with its key, optional>}}, got {up!r}"
            )
        key_env = str(up["api_key_env"]) if up.get("api_key_env") else None
        upstream = UpstreamSpec(str(up["url"]).rstrip("/"), str(up["model"]), key_env)
        return ModelSpec(name, None, where, upstream=upstream)
    if engine is not None and str(engine) not in ENGINES:
        raise ServeConfigError(
            f"{where}.engine={engine!r} ({name}) is not an engine process arenaflow launches; "
            f"use one of {list(ENGINES)}, or leave it out to serve in process"
        )
    return ModelSpec(name, str(e["uri"]), where, engine=str(engine) if engine else None)


def model_aliases(cfg: DictConfig, specs: list[ModelSpec]) -> dict[str, str]:
    """`serve.aliases`: other ids clients may send (`{alias: served name}`), validated against `specs`.

    The deployment uses one to serve the champion under `serve.served_model_name` when the champion
    is also one of the served competitors, so its weights load once.
    """
    raw = cfg.serve.get("aliases") or {}
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, dict):
        raise ServeConfigError("serve.aliases must map an alias to a served model name")
    names = [s.name for s in specs]
    aliases: dict[str, str] = {}
    for alias, target in raw.items():
        alias, target = str(alias), str(target)
        if alias in names:
            raise ServeConfigError(
                f"serve.aliases: {alias!r} is already a served model name; an alias needs its own id"
            )
        if target not in names:
            raise ServeConfigError(
                f"serve.aliases: {alias!r} points to {target!r}, which is not served (served: "
                f"{names})"
            )
        aliases[alias] = target
    return aliases


def _competitor_specs(cfg: DictConfig) -> list[ModelSpec]:
    """The local competitors of evaluate.competitors; remote ones are served by their own servers."""
    from arenaflow.evaluate.competitors import parse_competitors
    from arenaflow.models import resolve_reference

    try:
        competitors = parse_competitors(cfg.evaluate.competitors)
    except ValueError as e:
        raise ServeConfigError(f"serve.models_from=competitors: {e}") from e
    specs = []
    for i, c in enumerate(competitors):
        if c.is_remote:
            log.info("not serving competitor %r: it is a remote endpoint (%s)", c.name, c.base_url)
            continue
        try:
            uri = resolve_reference(str(c.local), cfg)
        except ValueError as e:
            raise ServeConfigError(f"serve.models_from=competitors ({c.name}): {e}") from e
        specs.append(ModelSpec(c.name, uri, f"evaluate.competitors[{i}]"))
    if not specs:
        raise ServeConfigError(
            "serve.models_from=competitors: evaluate.competitors has no local competitor to serve"
        )
    return specs


def resolve_served_model(cfg: DictConfig, spec: ModelSpec | None = None) -> ServedModel:
    """Download (if needed) the model of `spec` (default: `serve.model_uri`) and build its card."""
    from arenaflow.models import local_checkpoint

    if spec is None:
        spec = ModelSpec(str(cfg.serve.served_model_name), str(cfg.serve.model_uri), "serve")
    if spec.uri is None:
        raise ServeConfigError(
            f"{spec.origin} ({spec.name}) has no checkpoint: an upstream serves it"
        )
    uri, name = spec.uri, spec.name
    card: dict[str, Any] = {"id": name, "object": "model", "created": int(time.time())}
    card.update({"owned_by": "arenaflow", "root": uri})
    try:
        path, info = local_checkpoint(uri, cfg, spec.origin)
    except ValueError as e:
        raise ServeConfigError(str(e)) from e
    names = [name, uri]
    if info is not None:
        results = {k: _number(v) for k, v in info.tags.items() if _RESULT_TAG.match(k)}
        lineage = {k: v for k, v in info.tags.items() if not _RESULT_TAG.match(k)}
        lineage.update(
            {
                "registered_model": info.name,
                "version": info.version,
                "aliases": info.aliases,
                "run_id": info.run_id,
                "source": info.source,
            }
        )
        card.update({"version": info.version, "lineage": lineage, "results": results})
        names.append(f"models:/{info.name}/{info.version}")
    elif uri.startswith("runs:/"):
        card.update({"version": None, "lineage": {"run_uri": uri}, "results": {}})
    else:
        card.update({"version": None, "lineage": {"checkpoint": str(path)}, "results": {}})
    served = ServedModel(path=path, names=list(dict.fromkeys(names)), card=card)
    _resolve_base(cfg, spec, served)
    return served


def _resolve_base(cfg: DictConfig, spec: ModelSpec, served: ServedModel) -> None:
    """An adapter's base: resolved like any served model (a folder, or downloaded once into the
    cache), and checked to be the base the adapter was trained on."""
    from arenaflow.adapters import ADAPTER_META, check_base, is_adapter, read_adapter
    from arenaflow.models import local_checkpoint, model_identity

    if not is_adapter(served.path):
        return
    where = f"{spec.origin} (the base in {ADAPTER_META})"
    try:
        adapter = read_adapter(served.path)
        base, _ = local_checkpoint(adapter.base, cfg, where)
        if is_adapter(base) or not (base / "config.json").is_file():
            raise ValueError(f"{where}={adapter.base} is an adapter; an adapter needs a full base")
        tracking_uri = cfg.tracking.tracking_uri if cfg.tracking.enabled else None
        check_base(adapter, model_identity(adapter.base, tracking_uri))
    except ValueError as e:
        raise ServeConfigError(f"{spec.origin}: {e}") from e
    served.adapter, served.base = adapter, base
    served.card["lineage"].setdefault("adapter", "true")
    served.card["lineage"].setdefault("base_model", adapter.base)


def _number(value: str) -> Any:
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return value


def load_engine(cfg: DictConfig, served: ServedModel) -> Engine:
    """On the backend engine.backend picks (`arenaflow.engine.backends`): fp32 on CPU, the
    hardware's dtype (bf16) on GPU for hf."""
    from arenaflow.engine import backends

    engine = backends.load_engine(
        served.path,
        backends.EngineSpec.from_cfg(cfg),
        max_batch_size=int(cfg.serve.max_batch_size),
    )
    log.info("serving %s (%s) from %s", served.names[0], served.card.get("version"), served.path)
    return engine


def describe_engine(served: ServedModel, engine: Engine) -> None:
    """Add what only the loaded model knows to the card: its context window and chat template hash."""
    from arenaflow.models import chat_template_hash

    served.card["chat_template_hash"] = chat_template_hash(engine.tokenizer)
    served.card["context_length"] = engine.context_length
