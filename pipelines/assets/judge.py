"""Dagster assets of the LLM judge (group `judge`): MT-bench judgments and scores, with judge
health checks. Both call `arenaflow.judge`, the same library `python -m arenaflow.judge` runs."""

from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.judge import judge, score
from pipelines.metadata import counts_md, md_table, mlflow_link, png_md
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "judge"}
CODE_VERSION = source_version(__file__)
PARSE_CHECK = "judge_parse_failures_below_threshold"
CONSISTENCY_CHECK = "judge_position_consistency"
CALIBRATION_CHECK = "judge_calibration"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _samples(uri: str, n: int = 6) -> str:
    rows = []
    for row in io.read_jsonl(uri):
        rows.append(
            {
                "question_id": row["question_id"],
                "model": row["model"],
                "turn": row["turn"],
                "score": row["score"],
                "source": row.get("verdict_source"),
                "judgment": row["judgment"][:160],
            }
        )
        if len(rows) >= n:
            break
    return md_table(rows) if rows else "_none_"


def _marked(table: str, calibration: dict[str, Any]) -> str:
    """A table whose judge failed calibration opens with a warning line."""
    if calibration.get("passed"):
        return table
    note = calibration.get("summary") or "the judge was not calibrated"
    return f"**Uncalibrated judge: read these figures with care.** {note}\n\n{table}"


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
    answer_uris = {name: value["uri"] for name, value in mt_bench_answers.items()}
    out = judge(
        cfg,
        question_uri=mt_bench_questions["uri"],
        answer_uris=answer_uris,
        base_model_path=base_model.get("path"),
    )
    health = out["health"]
    calibration = out["calibration"]
    if not calibration["passed"]:
        context.log.warning(calibration["summary"])
    if out["budget_message"]:
        context.log.warning(out["budget_message"])
    health_rows = [{"metric": k, "value": v} for k, v in health.items()]
    yield dg.Output(
        value={
            "single_uri": out["single_uri"],
            "pair_uri": out["pair_uri"],
            "judge_model": out["judge_model"],
            "competitors": out["competitors"],
            "counts": out["counts"],
            "health": health,
            "calibration": calibration,
        },
        metadata={
            **meta,
            "judge_model": out["judge_model"],
            "single_uri": dg.MetadataValue.path(out["single_uri"]),
            "pair_uri": dg.MetadataValue.path(out["pair_uri"]),
            "single_judgments": out["counts"]["single"],
            "pairwise_judgments": out["counts"]["pair"],
            "calls_made": out["counts"]["calls_made"],
            "calls_cached": out["counts"]["calls_cached"],
            "tokens": out["counts"]["prompt_tokens"] + out["counts"]["completion_tokens"],
            "cost_estimate_usd": dg.MetadataValue.float(float(out["cost_usd"] or 0.0)),
            "parse_failure_rate": _rate(health["parse_failure_rate"]),
            "position_consistency": _rate(health["position_consistency"]),
            "counts": counts_md(out["counts"], key="count", value="value"),
            "judge_health": dg.MetadataValue.md(md_table(health_rows)),
            "skipped": counts_md(out["skipped"] or {"none": 0}),
            "budget": dg.MetadataValue.text(out["budget_message"] or "within budget"),
            "sample_single_judgments": dg.MetadataValue.md(_samples(out["single_uri"])),
            "judge_calibrated": calibration["passed"],
            "calibration": dg.MetadataValue.md(
                f"{calibration['summary']}\n\n{md_table(calibration['checks'])}"
            ),
            "calibration_uri": dg.MetadataValue.path(calibration["uri"]),
            "calibration_calls": out["counts"]["calibration_calls"],
            **mlflow_link(out["mlflow_url"]),
        },
    )
    parse_rate = health["parse_failure_rate"]
    parse_limit = float(cfg.judge.parse_error_threshold)
    yield dg.AssetCheckResult(
        check_name=PARSE_CHECK,
        passed=parse_rate is None or parse_rate <= parse_limit,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{_rate(parse_rate)} of judge replies had no readable verdict "
            f"(threshold {parse_limit:.0%}); {health['recovered_by_logprobs']} recovered from "
            f"logprobs, {health['unresolved']} unresolved"
        ),
        metadata={"parse_failure_rate": float(parse_rate or 0.0)},
    )
    consistency = health["position_consistency"]
    limit = float(cfg.judge.inconsistency_threshold)
    yield dg.AssetCheckResult(
        check_name=CONSISTENCY_CHECK,
        passed=consistency is None or 1.0 - consistency <= limit,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"position consistency {_rate(consistency)} over {health['pairs_with_both_orders']} "
            f"pairs (warns when inconsistency exceeds {limit:.0%})"
        ),
        metadata={"position_consistency": float(consistency if consistency is not None else 1.0)},
    )
    figures = calibration["figures"]
    yield dg.AssetCheckResult(
        check_name=CALIBRATION_CHECK,
        passed=bool(calibration["passed"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description=calibration["summary"],
        metadata={
            "checks": dg.MetadataValue.md(md_table(calibration["checks"])),
            **{k: float(v) for k, v in figures.items() if isinstance(v, int | float)},
        },
    )


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
    table = [
        {"model": m, **s, "unparsed (excluded)": out["unparsed"][m]}
        for m, s in out["scores"].items()
    ]
    table.sort(key=lambda r: -(r["average"] if r["average"] is not None else -1))
    cats = sorted({c for per in out["categories"].values() for c in per})
    cat_rows = [
        {"model": m, **{c: per.get(c) for c in cats}} for m, per in out["categories"].items()
    ]
    pair_rows = [{"model": m, **s} for m, s in out["pairwise"].items()]
    fs, path = io.fs_for(out["radar_uri"])
    with fs.open(path, "rb") as f:
        radar = f.read()
    return dg.Output(
        value={k: out[k] for k in ("uri", "scores", "pairwise", "categories", "judge_model")},
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(out["uri"]),
            "judge_model": out["judge_model"],
            "judge_calibrated": bool(calibration.get("passed")),
            "judge_calibration": dg.MetadataValue.text(
                calibration.get("summary") or "the judge was not calibrated"
            ),
            "mt_bench": dg.MetadataValue.md(_marked(md_table(table), calibration)),
            "by_category": dg.MetadataValue.md(md_table(cat_rows)),
            "radar": png_md(radar, "MT-bench by category"),
            "pairwise": dg.MetadataValue.md(md_table(pair_rows) if pair_rows else "_no pairs_"),
            "judge_health": dg.MetadataValue.md(
                md_table([{"metric": k, "value": v} for k, v in out["health"].items()])
            ),
            **mlflow_link(out["mlflow_url"]),
        },
    )
