"""Dagster assets of the LLM judge (group `judge`): MT-bench judgments and scores, with judge
health checks. Both call `arenaflow.judge`, the same library `python -m arenaflow.judge` runs."""

from typing import Any

import dagster as dg

from arenaflow.judge import judge, score
from arenaflow.judge.tables import (
    CALIBRATION_CHECK,
    CONSISTENCY_CHECK,
    JUDGMENTS_VALUE,
    PARSE_CHECK,
    SCORES_VALUE,
    health_checks,
    judgments_metadata,
    scores_metadata,
)
from pipelines.metadata import check_result, output
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "judge"}
CODE_VERSION = source_version(__file__)


@dg.asset(
    group_name="judge",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    check_specs=[
        dg.AssetCheckSpec(PARSE_CHECK, asset="mt_bench_judgments"),
        dg.AssetCheckSpec(CONSISTENCY_CHECK, asset="mt_bench_judgments"),
        dg.AssetCheckSpec(
            CALIBRATION_CHECK,
            asset="mt_bench_judgments",
            description="The judge tells reference answers from null ones (only then may it promote).",
        ),
    ],
    description="Single and pairwise MT-bench judgments by the LLM judge (FastChat JSONL), cached.",
)
def mt_bench_judgments(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    mt_bench_questions: dict[str, Any],
    mt_bench_answers: dict[str, dict[str, Any]],
    base_model: dict[str, Any],
):
    """Single and pairwise MT-bench judgments by the LLM judge (FastChat JSONL), cached."""
    cfg, meta = stage_config(context, hydra, config)
    out = judge(
        cfg,
        question_uri=mt_bench_questions["uri"],
        answer_uris={name: value["uri"] for name, value in mt_bench_answers.items()},
        base_model_path=base_model.get("path"),
    )
    if not out["calibration"]["passed"]:
        context.log.warning(out["calibration"]["summary"])
    if out["budget_message"]:
        context.log.warning(out["budget_message"])
    value = {k: out[k] for k in JUDGMENTS_VALUE}
    yield output(value, meta, judgments_metadata(out), mlflow_url=out["mlflow_url"])
    yield from map(check_result, health_checks(out, cfg.judge))


@dg.asset(
    group_name="judge",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    description="MT-bench scores per model and category, pairwise win rates, and judge health.",
)
def mt_bench_scores(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    mt_bench_judgments: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """MT-bench scores per model and category, pairwise win rates, and judge health."""
    cfg, meta = stage_config(context, hydra, config)
    out = score(
        cfg, single_uri=mt_bench_judgments["single_uri"], pair_uri=mt_bench_judgments["pair_uri"]
    )
    calibration = mt_bench_judgments.get("calibration") or {}
    value = {k: out[k] for k in SCORES_VALUE}
    return output(value, meta, scores_metadata(out, calibration), mlflow_url=out["mlflow_url"])
