"""Dagster assets of the `evaluate` group: MT-bench questions, answers per competitor, decontamination."""

from pathlib import Path
from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.config import compose_config
from arenaflow.evaluate import answer_competitor, decontaminate, write_questions
from arenaflow.evaluate.competitors import find_competitor, parse_competitors
from pipelines.metadata import counts_md, md_table, mlflow_link
from pipelines.resources import HydraConfigResource, StageConfig, default_overrides, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "evaluate"}
CODE_VERSION = source_version(__file__)


def competitor_names() -> list[str]:
    """Partition keys: the competitor names of the default config's `eval.competitors`."""
    cfg = compose_config(default_overrides())
    return [c.name for c in parse_competitors(cfg.eval.competitors)]


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
    rows = [{"category": k, "questions": v} for k, v in sorted(out["categories"].items())]
    return dg.Output(
        value={k: out[k] for k in ("uri", "count", "question_ids")},
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(out["uri"]),
            "source": dg.MetadataValue.text(out["source"]),
            "count": dg.MetadataValue.int(out["count"]),
            "question_ids": dg.MetadataValue.json(out["question_ids"]),
            "categories": dg.MetadataValue.md(md_table(rows)),
            "skipped_records": counts_md(out["skipped"] or {"none": 0}),
        },
    )


def _model_ref(local: str | None, base: dict[str, Any], finetuned: dict[str, Any]) -> str | None:
    """`local: base | finetuned` -> the upstream asset's checkpoint (its folder, else its MLflow URI)."""
    if local == "base":
        return str(base["path"])
    if local == "finetuned":
        path = finetuned.get("path")
        if path and Path(path).exists():
            return str(path)
        if finetuned.get("model_uri"):
            return str(finetuned["model_uri"])
        raise ValueError(f"finetuned_model has neither a local path nor a model_uri: {finetuned}")
    return None


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
    ref = _model_ref(competitor.local, base_model, finetuned_model)
    out = answer_competitor(cfg, name, model_ref=ref, questions_file=mt_bench_questions["uri"])
    if out["failed"]:
        context.log.warning("%s: %d question(s) failed: %s", name, out["failed"], out["failures"])
    failures = [{"question_id": f["question_id"], "error": f["error"]} for f in out["failures"]]
    return dg.Output(
        value={k: out[k] for k in ("uri", "model_id", "answered", "failed")},
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(out["uri"]),
            "model": dg.MetadataValue.text(str(out["model"])),
            "answers": dg.MetadataValue.int(out["answered"]),
            "generated": dg.MetadataValue.int(out["generated"]),
            "reused": dg.MetadataValue.int(out["reused"]),
            "failed": dg.MetadataValue.int(out["failed"]),
            "failures": dg.MetadataValue.md(md_table(failures) if failures else "_none_"),
            "tokens_generated": dg.MetadataValue.int(out["tokens_generated"]),
            "tokens_per_s": dg.MetadataValue.float(float(out["tokens_per_s"])),
            "sample_answers": dg.MetadataValue.md(md_table(out["samples"])),
            **mlflow_link(out.get("mlflow_url")),
        },
    )


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
    listed = [
        {
            **c,
            "question_ids": ", ".join(map(str, c["question_ids"])),
            "sources": ", ".join(c["sources"]),
        }
        for c in report["conversations"]
    ]
    summary = {
        k: report[k]
        for k in (
            "ngram",
            "questions_checked",
            "conversations_scanned",
            "overlapping_conversations",
            "contaminated_share",
            "threshold",
        )
    }
    yield dg.Output(
        value={
            "uri": report["uri"],
            "contaminated_question_ids": report["contaminated_question_ids"],
            "contaminated_share": report["contaminated_share"],
        },
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(report["uri"]),
            **{
                k: dg.MetadataValue.int(v) if isinstance(v, int) else dg.MetadataValue.float(v)
                for k, v in summary.items()
            },
            "contaminated_question_ids": dg.MetadataValue.json(report["contaminated_question_ids"]),
            "overlapping_conversations_listed": dg.MetadataValue.md(
                md_table(listed) if listed else "_none_"
            ),
            "skipped_records": counts_md(report["skipped"] or {"none": 0}),
        },
    )
    yield dg.AssetCheckResult(
        check_name=CHECK,
        passed=not report["above_threshold"],
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{report['contaminated_share']:.1%} of MT-bench questions share {report['ngram']}-grams "
            f"with the SFT data (threshold {report['threshold']:.1%})"
        ),
        metadata={
            "contaminated_share": report["contaminated_share"],
            "contaminated_question_ids": dg.MetadataValue.json(report["contaminated_question_ids"]),
        },
    )
