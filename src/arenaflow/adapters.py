"""Adapter checkpoints (LoRA through peft): a folder that holds an adapter and names the base it goes on.

The on-disk contract with training (`train=lora`): peft's own `adapter_config.json` +
`adapter_model.safetensors` (`save_pretrained`), the tokenizer files with the chat template, and
`arenaflow_adapter.json` = {"base": <a checkpoint folder or a models:/ | runs:/ URI>, "base_digest":
<`arenaflow.models.model_identity` of that base, or null>}. A plain peft folder without the arenaflow
file is taken with the base peft recorded (`base_model_name_or_path`). Every loader of a checkpoint
(the engine, hence MT-bench answers, the local judge and the chat, and the server) takes an adapter
folder as well: the base comes from this file and must still be the one the adapter was trained on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ADAPTER_META = "arenaflow_adapter.json"
PEFT_CONFIG = "adapter_config.json"
BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch's adapter_names


@dataclass(frozen=True)
class AdapterCheckpoint:
    """An adapter folder and the base it was trained on."""

    path: Path
    base: str  # a checkpoint folder or a models:/ | runs:/ URI
    base_digest: str | None  # model_identity of the base at training time, when recorded


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A full checkpoint folder (config.json) or an adapter folder (adapter_config.json)."""
    return (Path(path) / "config.json").is_file() or is_adapter(path)


def read_adapter(path: str | Path) -> AdapterCheckpoint:
    """The adapter at `path` and its base; ValueError naming the file and the fix when it names none."""
    path = Path(path)
    meta_file = path / ADAPTER_META
    source = meta_file if meta_file.exists() else path / PEFT_CONFIG
    try:
        meta = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"adapter {path}: cannot read {source.name} ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"adapter {path}: {source.name} is not a JSON object")
    base = meta.get("base") if source == meta_file else meta.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"adapter {path} names no base model; write {ADAPTER_META} beside it with "
            '{"base": "<checkpoint folder or models:/name/N>"}'
        )
    digest = meta.get("base_digest") if source == meta_file else None
    return AdapterCheckpoint(path, str(base), str(digest) if digest else None)


def check_base(adapter: AdapterCheckpoint, identity: str) -> None:
    """Raise ValueError when the base now has another identity than the one the adapter was trained on:
    LoRA weights over other base weights compute nonsense without any error of their own."""
    if adapter.base_digest is not None and identity != adapter.base_digest:
        raise ValueError(
            f"adapter {adapter.path} was trained on {adapter.base} with identity "
            f"{adapter.base_digest}, but that base is now {identity}; serve the adapter over its "
            "own base (a pinned models:/name/N or the original folder) or retrain it"
        )


def base_folder(adapter: AdapterCheckpoint, tracking_uri: str | None = None) -> Path:
    """The local checkpoint folder of the adapter's base (downloaded when it is a registry / run URI),
    checked against the recorded identity."""
    from arenaflow.models import checkpoint_in, model_identity

    ref = adapter.base
    if ref.startswith(("models:/", "runs:/")):
        from arenaflow.tracking import MlflowTracker

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(
                f"adapter {adapter.path}: its base {ref} needs the MLflow registry; pass "
                "tracking_uri= (the config's tracking.tracking_uri) or set MLFLOW_TRACKING_URI"
            )
        folder = checkpoint_in(MlflowTracker(uri, "arenaflow").download_model(ref))
        tracking_uri = uri
    else:
        folder = Path(ref)
    if folder is None or not (folder / "config.json").is_file() or is_adapter(folder):
        raise ValueError(
            f"adapter {adapter.path}: its base {ref} is not a full checkpoint folder (no "
            f"config.json, or an adapter itself); fix `base` in {ADAPTER_META}"
        )
    check_base(adapter, model_identity(ref, tracking_uri))
    return folder


def apply_adapters(base_model: Any, adapters: dict[str, Path]) -> Any:
    """`base_model` wrapped by peft with every adapter loaded under its name (one copy of the base);
    a forward picks each row's adapter with `adapter_names=` (peft's mixed-batch inference)."""
    from peft import PeftModel

    (first, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base_model, str(first_path), adapter_name=first)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


def merged_model(base_model: Any, adapter_path: Path) -> Any:
    """The base with the adapter's weights merged in: a plain transformers model, as fast as the base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_path)).merge_and_unload().eval()
