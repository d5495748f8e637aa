"""Dagster assets of the `evaluate` group: MT-bench questions, answers per competitor, decontamination."""

from pathlib import Path
from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.config import compose_config
from arenaflow.evaluate import answer_competitor, decontaminate, write_questions
from arenaflow.evaluate.competitors import find_competitor, parse_competitors
from arenaflow.evaluate.tables import (
    answers_output,
    contamination_check,
    decontamination_output,
    questions_output,
)
from arenaflow.models import resolve_reference
from pipelines.metadata import check_result, output
from pipelines.resources import HydraConfigResource, StageConfig, default_overrides, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "evaluate"}
CODE_VERSION = source_version(__file__)


def competitor_names() -> list[str]:
    """Partition keys: the competitor names of the default config's `evaluate.competitors`."""
    cfg = compose_config(default_overrides())
    return [c.name for c in parse_competitors(cfg.evaluate.competitors)]


competitors_partitions = dg.StaticPartitionsDefinition(competitor_names())


@dg.asset(
    group_name="evaluate",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    description="The selected MT-bench questions, written as FastChat question.jsonl.",
)
def mt_bench_questions(
    context: dg.AssetExecutionContext, hydra: HydraConfigResource, config: StageConfig
) -> dg.Output[dict[str, Any]]:
    """The selected MT-bench questions, written as FastChat question.jsonl."""
    cfg, meta = stage_config(context, hydra, config)
    out = write_questions(cfg)
    value, plain = questions_output(out)
    return output(value, meta, plain)


def _checkpoint(finetuned: dict[str, Any]) -> str:
    """The fine-tune's checkpoint as the finetuned_model asset recorded it: its folder when it is
    on this machine, else its MLflow URI."""
    path = finetuned.get("path")
    if path and Path(path).exists():
        return str(path)
    if finetuned.get("model_uri"):
        return str(finetuned["model_uri"])
    raise ValueError(f"finetuned_model has neither a local path nor a model_uri: {finetuned}")


@dg.asset(
    group_name="evaluate",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    partitions_def=competitors_partitions,
    description="One competitor's two-turn MT-bench answers (FastChat JSONL), resumable.",
)
def mt_bench_answers(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    mt_bench_questions: dict[str, Any],
    base_model: dict[str, Any],
    finetuned_model: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """One competitor's two-turn MT-bench answers (FastChat JSONL), resumable."""
    cfg, meta = stage_config(context, hydra, config)
    name = context.partition_key
    competitor = find_competitor(cfg, name)
    ref = None
    if competitor.local:  # base / finetuned are this run's upstream models
        ref = resolve_reference(
            competitor.local,
            cfg,
            base=str(base_model["path"]),
            finetuned=_checkpoint(finetuned_model) if competitor.local == "finetuned" else None,
        )
    out = answer_competitor(cfg, name, model_ref=ref, questions_file=mt_bench_questions["uri"])
    if out["failed"]:
        context.log.warning("%s: %d question(s) failed: %s", name, out["failed"], out["failures"])
    value, plain = answers_output(out)
    return output(value, meta, plain, mlflow_url=out.get("mlflow_url"))


CHECK = "contamination_below_threshold"


@dg.asset(
    group_name="evaluate",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    check_specs=[dg.AssetCheckSpec(CHECK, asset="decontamination_report")],
    description="N-gram overlap between the SFT conversations and MT-bench questions/references.",
)
def decontamination_report(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    sharegpt_clean: Any,
    mt_bench_questions: dict[str, Any],
):
    """N-gram overlap between the SFT conversations and MT-bench questions/references."""
    cfg, meta = stage_config(context, hydra, config)
    sft_uri = sharegpt_clean.get("uri") if isinstance(sharegpt_clean, dict) else None
    report = decontaminate(cfg, sft_uri or io.artifact_uri(cfg, "data", "sharegpt_clean.jsonl"))
    value, plain = decontamination_output(report)
    yield output(value, meta, plain)
    yield check_result({"name": CHECK, **contamination_check(report)})
