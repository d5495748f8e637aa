"""The base model: a local checkpoint folder, registered once as a version of the tracked model.

The base is the first incumbent of the `champion` alias (arenaflow.rating.promote): a fine-tune
must beat it in a paired comparison before it is served, and until one does, the base is served.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from arenaflow.config import config_hash
from arenaflow.export.registry import attach_gguf
from arenaflow.models import weights_config
from arenaflow.tracking import tracker_from_cfg

log = logging.getLogger(__name__)

TAG_ROLE = "arenaflow.role"
TAG_BASE_ID = "arenaflow.base_id"


def resolve_base(cfg: DictConfig) -> dict[str, Any]:
    """The base_model value: a local checkpoint folder with the tokenizer and chat template."""
    from transformers import AutoConfig

    from arenaflow.models import chat_template_hash, load_tokenizer, resolve_model
    from arenaflow.train.flops import model_shape

    path = resolve_model(cfg.model, cfg.paths.cache_dir)
    tokenizer = load_tokenizer(path, cfg.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    shape = model_shape(config)
    return {
        "path": str(path),
        "name": cfg.model.name,
        "chat_template_hash": chat_template_hash(tokenizer),
        "n_params": shape.n_params,
        "architecture": type(config).__name__,
        "hidden_size": shape.hidden_size,
        "num_layers": shape.n_layers,
        "vocab_size": shape.vocab_size,
        "max_length": int(cfg.model.max_length),
        "chat_template": tokenizer.chat_template,
    }


def base_identity(cfg: DictConfig, info: dict[str, Any]) -> str:
    """Same model config, chat template and checkpoint files (names and sizes) -> same base."""
    files = sorted(
        (str(p.relative_to(info["path"])), p.stat().st_size)
        for p in Path(info["path"]).rglob("*")
        if p.is_file()
    )
    model = weights_config(cfg.model)
    return config_hash({"model": model, "template": info["chat_template_hash"], "files": files})


def register_base(cfg: DictConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The registry version of the base checkpoint, registered on first use (tag arenaflow.role=base).

    Returns {version, model_uri, gguf}, None / {} when tracking is off. A base already registered
    with the same identity is reused, so repeated runs add no versions and copy no weights again;
    it gets the GGUF files of `model.gguf_export` it lacks (`arenaflow.export.registry`).
    """
    tracker = tracker_from_cfg(cfg)
    if not tracker.enabled:
        return {"version": None, "model_uri": None, "gguf": {}}
    name = str(cfg.tracking.registered_model_name)
    ident = base_identity(cfg, info)
    formats = cfg.model.gguf_export or ()
    for v in tracker.latest_versions(name):
        if v.tags.get(TAG_ROLE) == "base" and v.tags.get(TAG_BASE_ID) == ident:
            gguf = attach_gguf(tracker, v, info["path"], formats)  # files it lacks, if any
            return {"version": v.version, "model_uri": f"models:/{name}/{v.version}", "gguf": gguf}
    m = cfg.model
    source = m.path or (f"{m.package}:{m.gguf_file}" if m.source == "gguf_package" else m.source)
    tags = {
        TAG_ROLE: "base",
        TAG_BASE_ID: ident,
        "arenaflow.base_model": info["name"],
        "chat_template_hash": info["chat_template_hash"],
        "arenaflow.lineage.source": f"{m.source} {source}",
        "arenaflow.lineage": f"base model {info['name']} ({m.source} {source}), not fine-tuned",
    }
    with tracker.start_run("base_model", cfg, tags={TAG_ROLE: "base"}) as run:
        registered = tracker.register_model(run, info["path"], name, tags=tags)
        gguf = attach_gguf(tracker, registered, info["path"], formats, run=run)
    log.info(
        "registered the base model %s as %s version %s", info["name"], name, registered.version
    )
    uri = f"models:/{name}/{registered.version}"
    return {"version": registered.version, "model_uri": uri, "gguf": gguf}
