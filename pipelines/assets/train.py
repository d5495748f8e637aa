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
from arenaflow.redact import redact_overrides
from arenaflow.train import plan, register_base, resolve_base
from arenaflow.train.reporting import REPORTER_ENV
from arenaflow.train.tables import base_output, finetuned_output, missing_checkpoint_files
from pipelines.metadata import output, to_metadata
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
    value, plain = base_output(info, registered)
    return output(value, meta, plain)


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
    value, plain = finetuned_output(result)
    return output(value, meta, plain, reported, mlflow_url=result.get("run_url"))


@dg.asset_check(
    asset=finetuned_model,
    description="The final checkpoint is complete and carries the chat template it was trained with.",
)
def finetuned_model_checkpoint_complete(finetuned_model: dict[str, Any]) -> dg.AssetCheckResult:
    """The final checkpoint is complete and carries the chat template it was trained with."""
    from arenaflow.models import chat_template_hash, load_tokenizer

    missing = missing_checkpoint_files(finetuned_model["path"])
    saved_hash = (
        chat_template_hash(load_tokenizer(finetuned_model["path"])) if not missing else None
    )
    return dg.AssetCheckResult(
        passed=not missing and saved_hash == finetuned_model["chat_template_hash"],
        metadata=to_metadata(
            {
                "missing_files": missing,
                "saved_chat_template_hash": saved_hash or "",
                "trained_chat_template_hash": finetuned_model["chat_template_hash"],
            }
        ),
    )
