"""Group `train`: the base checkpoint, and the fine-tuned chat model trained through Dagster Pipes.

`finetuned_model` runs the same command a user runs by hand (`python -m arenaflow.train
<overrides>`) as an external process, so multi-rank FSDP (torchrun) works and logs stream into
the Dagster run; the child writes result.json, which becomes the asset value and metadata.
"""

import sys
from pathlib import Path
from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.config import REPO_ROOT
from arenaflow.plots import line, to_png
from arenaflow.tracking import redact_overrides
from arenaflow.train import plan, register_base, resolve_base
from arenaflow.train.reporting import REPORTER_ENV
from pipelines.metadata import md_table, mlflow_link, png_md
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.train_pipes import REPORTER as PIPES_REPORTER
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "train"}
CODE_VERSION = source_version(__file__)


@dg.asset(
    group_name="train",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"huggingface"},
    description="A local Hugging Face checkpoint of the base model, with its tokenizer and chat template, registered as the first incumbent.",
)
def base_model(
    context: dg.AssetExecutionContext, hydra: HydraConfigResource, config: StageConfig
) -> dg.Output[dict[str, Any]]:
    """A local Hugging Face checkpoint of the base model, with its tokenizer and chat template,
    registered once as a version of the tracked model (the first incumbent of `champion`)."""
    cfg, meta = stage_config(context, hydra, config)
    info = resolve_base(cfg)
    registered = register_base(cfg, info)
    value = {k: info[k] for k in ("path", "name", "chat_template_hash")} | registered
    arch = [
        {"field": k, "value": info[k]}
        for k in (
            "architecture",
            "n_params",
            "hidden_size",
            "num_layers",
            "vocab_size",
            "max_length",
        )
    ]
    return dg.Output(
        value=value,
        metadata={
            **meta,
            "path": dg.MetadataValue.path(info["path"]),
            "name": info["name"],
            "n_params": info["n_params"],
            "model_uri": registered["model_uri"] or "(not registered: tracking is off)",
            "chat_template_hash": info["chat_template_hash"],
            "architecture": dg.MetadataValue.md(md_table(arch)),
            "chat_template": dg.MetadataValue.md(f"```jinja\n{info['chat_template']}\n```"),
        },
    )


@dg.asset(
    group_name="train",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"pytorch", "mlflow"},
    description="The chat model fine-tuned on sft_dataset with Vicuna's recipe (Lightning FSDP2), registered in MLflow.",
)
def finetuned_model(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    sft_dataset: dict[str, Any],
    base_model: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """The chat model fine-tuned on sft_dataset with Vicuna's recipe, registered in MLflow."""
    data_overrides = [f"train.data_uri={sft_dataset['uri']}"]
    if sft_dataset.get("data_hash"):
        data_overrides.append(f"train.data_hash={sft_dataset['data_hash']}")
    stage = StageConfig(overrides=[*config.overrides, *data_overrides])
    cfg, meta = stage_config(context, hydra, stage)
    if base_model.get("name") != cfg.model.name:
        context.log.warning(
            f"base_model was materialized for {base_model.get('name')!r} but this run trains "
            f"{cfg.model.name!r}; rematerialize base_model with the same overrides"
        )
    p = plan(cfg)  # memory preflight and output folder, before any process starts
    command = [sys.executable, "-m", "arenaflow.train", *hydra.overrides, *stage.overrides]
    context.log.info(f"launching: {' '.join(redact_overrides(command))}")
    invocation = dg.PipesSubprocessClient(cwd=str(REPO_ROOT)).run(
        command=command,
        context=context,
        env={"PYTHONUNBUFFERED": "1", REPORTER_ENV: PIPES_REPORTER},
    )
    reported = invocation.get_materialize_result().metadata or {}
    result = io.read_json(str(Path(p.out_dir) / "result.json"))
    value = {
        k: result.get(k)
        for k in ("path", "model_uri", "version", "run_id", "final_loss", "chat_template_hash")
    }
    return dg.Output(value=value, metadata={**meta, **_train_metadata(result), **reported})


def _train_metadata(result: dict[str, Any]) -> dict[str, Any]:
    history = result.get("history") or []
    metadata: dict[str, Any] = {
        "path": dg.MetadataValue.path(result["path"]),
        "model_uri": result.get("model_uri") or "(not registered)",
        "final_loss": result.get("final_loss"),
        "val_loss": result.get("val_loss"),
        "steps": result.get("steps"),
        "resumed_from": result.get("resumed_from") or "(fresh start)",
        "tokens_per_s": result.get("tokens_per_s"),
        "trained_tokens_per_s": result.get("trained_tokens_per_s"),
        "mfu": result.get("mfu"),
        "peak_tflops": result.get("peak_tflops"),
        "peak_source": result.get("peak_source"),
        "world_size": result.get("world_size"),
        "gradient_accumulation": result.get("accumulate"),
        "compiled_layers": result.get("compiled"),
        "retained_heap": result.get("retained_heap"),
        "chat_template_hash": result.get("chat_template_hash"),
        "data_hash": result.get("data_hash"),
        "memory_estimate_gb": dg.MetadataValue.json(result.get("memory_estimate_gb") or {}),
        "data_counts": dg.MetadataValue.json(result.get("data_counts") or {}),
        **mlflow_link(result.get("run_url")),
    }
    if history:
        fig = line(
            [r["step"] for r in history],
            [r["loss"] for r in history],
            "training loss",
            "step",
            "loss",
        )
        metadata["loss_curve"] = png_md(to_png(fig), "loss curve")
        rows = history[-10:]
        metadata["last_steps"] = dg.MetadataValue.md(
            md_table(rows, ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"])
        )
    if result.get("val_history"):
        metadata["validation"] = dg.MetadataValue.md(md_table(result["val_history"]))
    return {k: v for k, v in metadata.items() if v is not None}


@dg.asset_check(
    asset=finetuned_model,
    description="The final checkpoint is complete and carries the chat template it was trained with.",
)
def finetuned_model_checkpoint_complete(finetuned_model: dict[str, Any]) -> dg.AssetCheckResult:
    """The final checkpoint is complete and carries the chat template it was trained with."""
    from arenaflow.models import chat_template_hash, load_tokenizer

    path = Path(finetuned_model["path"])
    missing = [
        f
        for f in ("config.json", "model.safetensors", "tokenizer_config.json")
        if not (path / f).exists()
    ]
    saved_hash = chat_template_hash(load_tokenizer(path)) if not missing else None
    return dg.AssetCheckResult(
        passed=not missing and saved_hash == finetuned_model["chat_template_hash"],
        metadata={
            "missing_files": dg.MetadataValue.json(missing),
            "saved_chat_template_hash": saved_hash or "",
            "trained_chat_template_hash": finetuned_model["chat_template_hash"],
        },
    )
