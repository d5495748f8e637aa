"""What the train steps show a person: the asset value each step hands on, its metadata as plain
values and `arenaflow.report` tables, and what a complete checkpoint holds (the Dagster assets
convert them)."""

from __future__ import annotations

from pathlib import Path as LocalPath
from typing import Any

from arenaflow.plots import line, to_png
from arenaflow.report import Image, Markdown, Path, Table

BASE_VALUE = ("path", "name", "chat_template_hash")
BASE_ARCHITECTURE = (
    "architecture",
    "n_params",
    "hidden_size",
    "num_layers",
    "vocab_size",
    "max_length",
)
FINETUNED_VALUE = ("path", "model_uri", "version", "run_id", "final_loss", "chat_template_hash")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
ADAPTER_FILES = (  # a LoRA run's checkpoint (arenaflow.train.lora)
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer_config.json",
    "arenaflow_adapter.json",
)
STEP_COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"]
RESULT_FIGURES = {  # metadata key -> result.json key
    "final_loss": "final_loss",
    "val_loss": "val_loss",
    "steps": "steps",
    "tokens_per_s": "tokens_per_s",
    "trained_tokens_per_s": "trained_tokens_per_s",
    "mfu": "mfu",
    "peak_tflops": "peak_tflops",
    "peak_source": "peak_source",
    "world_size": "world_size",
    "gradient_accumulation": "accumulate",
    "compiled_layers": "compiled",
    "retained_heap": "retained_heap",
    "chat_template_hash": "chat_template_hash",
    "data_hash": "data_hash",
    "trainable_params": "trainable_params",
}


def base_output(
    info: dict[str, Any], registered: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of the base checkpoint: where it is, its size and chat template."""
    value = {k: info[k] for k in BASE_VALUE} | registered
    return value, {
        "path": Path(info["path"]),
        "name": info["name"],
        "n_params": info["n_params"],
        "model_uri": registered["model_uri"] or "(not registered: tracking is off)",
        "chat_template_hash": info["chat_template_hash"],
        "architecture": Table([{"field": k, "value": info[k]} for k in BASE_ARCHITECTURE]),
        "chat_template": Markdown(f"```jinja\n{info['chat_template']}\n```"),
    }


def finetuned_output(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of a training run's result.json: figures, loss curve, last steps."""
    value = {k: result.get(k) for k in FINETUNED_VALUE}
    history = result.get("history") or []
    meta: dict[str, Any] = {
        "path": Path(result["path"]),
        "model_uri": result.get("model_uri") or "(not registered)",
        "resumed_from": result.get("resumed_from") or "(fresh start)",
        **{k: result.get(src) for k, src in RESULT_FIGURES.items()},
        "memory_estimate_gb": result.get("memory_estimate_gb") or {},
        "memory_measured_gb": result.get("memory_measured_gb") or {},
        "data_counts": result.get("data_counts") or {},
    }
    if history:
        steps, losses = [r["step"] for r in history], [r["loss"] for r in history]
        png = to_png(line(steps, losses, "training loss", "step", "loss"))
        meta["loss_curve"] = Image("loss curve", png=png)
        meta["last_steps"] = Table(history[-10:], STEP_COLUMNS)
    if result.get("val_history"):
        meta["validation"] = Table(result["val_history"])
    if result.get("adapter"):
        adapter = result["adapter"]
        meta["adapter"] = Path(adapter["path"])
        meta["adapter_base"] = adapter["base"]
        meta["adapter_merged"] = adapter["merged"]
    return value, meta


def missing_checkpoint_files(path: str) -> list[str]:
    """The files a loadable Hugging Face checkpoint (or a LoRA adapter checkpoint, which names
    its base in arenaflow_adapter.json) needs that `path` lacks."""
    folder = LocalPath(path)
    needed = ADAPTER_FILES if (folder / "arenaflow_adapter.json").exists() else CHECKPOINT_FILES
    return [f for f in needed if not (folder / f).exists()]
