"""Resolve `serve.model_uri` to an engine and a model card (lineage + MT-bench / rating results).

The registry is the source of truth for what is served: a `models:/name@champion` URI is pinned to
the version the alias names at start-up, and that version's tags become the card that
`GET /v1/models` shows, so a client can see which run trained the model and how it scored.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from arenaflow.engine import Engine
from arenaflow.tracking import parse_models_uri, tracker_from_cfg

log = logging.getLogger(__name__)

# version tags that are results (the rating stage writes arenaflow.rating*, arenaflow.mt_bench_score)
_RESULT_TAG = re.compile(
    r"^(arenaflow\.)?(mt_?bench|elo|bt_|bradley|rating|leaderboard|score|win|judge)", re.I
)


@dataclass
class ServedModel:
    """What the app serves: the checkpoint folder, the names clients may ask for and the card."""

    path: Path
    names: list[str]
    card: dict[str, Any] = field(default_factory=dict)


def resolve_served_model(cfg: DictConfig) -> ServedModel:
    """Download (if needed) the model named by `serve.model_uri` and build its card."""
    uri = str(cfg.serve.model_uri)
    name = str(cfg.serve.served_model_name)
    card: dict[str, Any] = {"id": name, "object": "model", "created": int(time.time())}
    card.update({"owned_by": "arenaflow", "root": uri})
    if uri.startswith("models:/"):
        reg_name, version, alias = parse_models_uri(uri)
        tracker = tracker_from_cfg(cfg)
        if not tracker.enabled:
            raise ValueError(
                f"serve.model_uri={uri} needs the MLflow registry, but tracking is disabled; "
                "use tracking=local or give a checkpoint folder"
            )
        info = tracker.get_version(reg_name, alias=alias, version=version)
        if info is None:
            what = f"alias @{alias}" if alias else f"version {version}"
            raise ValueError(
                f"serve.model_uri={uri}: the MLflow registry has no {what} of {reg_name!r}; "
                "materialize champion_model (or register a model) first, or serve a checkpoint folder"
            )
        # keyed by the artifact source too: two registries can both have a "version 1"
        key = hashlib.sha256(info.source.encode()).hexdigest()[:10]
        dest = Path(cfg.paths.cache_dir) / "serve" / f"{reg_name}-v{info.version}-{key}"
        path = _cached_download(dest) or tracker.download_model(
            f"models:/{reg_name}/{info.version}", dest
        )
        results = {k: _number(v) for k, v in info.tags.items() if _RESULT_TAG.match(k)}
        lineage = {k: v for k, v in info.tags.items() if not _RESULT_TAG.match(k)}
        lineage.update(
            {
                "registered_model": reg_name,
                "version": info.version,
                "aliases": info.aliases,
                "run_id": info.run_id,
                "source": info.source,
            }
        )
        card.update({"version": info.version, "lineage": lineage, "results": results})
        names = [name, uri, f"models:/{reg_name}/{info.version}"]
    else:
        path = Path(uri)
        card.update({"version": None, "lineage": {"checkpoint": str(path)}, "results": {}})
        names = [name, uri]
    return ServedModel(path=path, names=list(dict.fromkeys(names)), card=card)


def _cached_download(dest: Path) -> Path | None:
    """A registry version is immutable, so an earlier download of it is reused."""
    for candidate in (dest / "model", dest):
        if (candidate / "config.json").exists():
            return candidate
    return None


def _number(value: str) -> Any:
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return value


def load_engine(cfg: DictConfig, served: ServedModel) -> Engine:
    """fp32 on CPU, the hardware's dtype (bf16) on GPU."""
    gpu = cfg.hardware.accelerator == "gpu"
    dtype = str(cfg.hardware.dtype) if gpu else "float32"
    engine = Engine.load(
        served.path,
        dtype=dtype,
        device="cuda" if gpu else "cpu",
        max_batch_size=int(cfg.serve.max_batch_size),
    )
    log.info("serving %s (%s) from %s", served.names[0], served.card.get("version"), served.path)
    return engine


def describe_engine(served: ServedModel, engine: Engine) -> None:
    """Add what only the loaded model knows to the card: its context window and chat template hash."""
    from arenaflow.models import chat_template_hash

    served.card["chat_template_hash"] = chat_template_hash(engine.tokenizer)
    served.card["context_length"] = engine.context_length
