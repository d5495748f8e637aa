"""What the judge stage shows a person: the metadata of its judgments and scores as plain values
and `arenaflow.report` tables, and the judge-health checks with their thresholds (the Dagster
assets convert them; nothing here knows Dagster)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.report import Image, Path, Table, counts_table

JUDGMENTS_VALUE = (
    "single_uri",
    "pair_uri",
    "judge_model",
    "competitors",
    "counts",
    "health",
    "calibration",
)
SCORES_VALUE = ("uri", "scores", "pairwise", "categories", "judge_model")
PARSE_CHECK = "judge_parse_failures_below_threshold"
CONSISTENCY_CHECK = "judge_position_consistency"
CALIBRATION_CHECK = "judge_calibration"


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def samples(uri: str, n: int = 6) -> Table:
    """The first `n` single judgments, each reply cut to 160 characters."""
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
    return Table(rows, empty="_none_")


def metric_table(figures: dict[str, Any]) -> Table:
    return Table([{"metric": k, "value": v} for k, v in figures.items()])


def judgments_metadata(out: dict[str, Any]) -> dict[str, Any]:
    """The judge step's metadata: calls, tokens and cost, judge health, calibration, samples."""
    counts, health, calibration = out["counts"], out["health"], out["calibration"]
    return {
        "judge_model": out["judge_model"],
        "single_uri": Path(out["single_uri"]),
        "pair_uri": Path(out["pair_uri"]),
        "single_judgments": counts["single"],
        "pairwise_judgments": counts["pair"],
        **{k: counts[k] for k in ("calls_made", "calls_cached", "calibration_calls")},
        "tokens": counts["prompt_tokens"] + counts["completion_tokens"],
        "cost_estimate_usd": float(out["cost_usd"] or 0.0),
        "parse_failure_rate": rate(health["parse_failure_rate"]),
        "position_consistency": rate(health["position_consistency"]),
        "counts": counts_table(counts, key="count", value="value"),
        "judge_health": metric_table(health),
        "skipped": counts_table(out["skipped"] or {"none": 0}),
        "parse_failures": counts_table(out["parse_errors"] or {"none": 0}),  # why no verdict
        "budget": out["budget_message"] or "within budget",
        "sample_single_judgments": samples(out["single_uri"]),
        "judge_calibrated": calibration["passed"],
        "calibration": Table(calibration["checks"], note=calibration["summary"]),
        "calibration_uri": Path(calibration["uri"]),
    }


def health_checks(out: dict[str, Any], judge_cfg: DictConfig) -> list[dict[str, Any]]:
    """The judge's health checks, each `{name, passed, severity (warn|error), description,
    metadata}`: readable verdicts (`judge.parse_error_threshold`), position consistency
    (`judge.inconsistency_threshold`) and calibration (only a calibrated judge may promote)."""
    health, calibration = out["health"], out["calibration"]
    parse_rate = health["parse_failure_rate"]
    parse_limit = float(judge_cfg.parse_error_threshold)
    consistency = health["position_consistency"]
    limit = float(judge_cfg.inconsistency_threshold)
    figures = calibration["figures"]
    return [
        {
            "name": PARSE_CHECK,
            "passed": parse_rate is None or parse_rate <= parse_limit,
            "severity": "warn",
            "description": f"{rate(parse_rate)} of judge replies had no readable verdict "
            f"(threshold {parse_limit:.0%}); {health['recovered_by_logprobs']} recovered from "
            f"logprobs, {health['unresolved']} unresolved",
            "metadata": {"parse_failure_rate": float(parse_rate or 0.0)},
        },
        {
            "name": CONSISTENCY_CHECK,
            "passed": consistency is None or 1.0 - consistency <= limit,
            "severity": "warn",
            "description": f"position consistency {rate(consistency)} over "
            f"{health['pairs_with_both_orders']} pairs (warns when inconsistency exceeds "
            f"{limit:.0%})",
            "metadata": {
                "position_consistency": float(consistency if consistency is not None else 1.0)
            },
        },
        {
            "name": CALIBRATION_CHECK,
            "passed": bool(calibration["passed"]),
            "severity": "error",
            "description": calibration["summary"],
            "metadata": {
                "checks": Table(calibration["checks"]),
                **{k: float(v) for k, v in figures.items() if isinstance(v, int | float)},
            },
        },
    ]


def scores_metadata(out: dict[str, Any], calibration: dict[str, Any]) -> dict[str, Any]:
    """The scoring step's metadata: MT-bench per model (marked when the judge failed
    calibration), per category, the radar plot, pairwise win rates and judge health."""
    table = [
        {"model": m, **s, "unparsed (excluded)": out["unparsed"][m]}
        for m, s in out["scores"].items()
    ]
    table.sort(key=lambda r: -(r["average"] if r["average"] is not None else -1))
    cats = sorted({c for per in out["categories"].values() for c in per})
    cat_rows = [
        {"model": m, **{c: per.get(c) for c in cats}} for m, per in out["categories"].items()
    ]
    note = ""
    if not calibration.get("passed"):
        summary = calibration.get("summary") or "the judge was not calibrated"
        note = f"**Uncalibrated judge: read these figures with care.** {summary}"
    return {
        "uri": Path(out["uri"]),
        "judge_model": out["judge_model"],
        "judge_calibrated": bool(calibration.get("passed")),
        "judge_calibration": calibration.get("summary") or "the judge was not calibrated",
        "mt_bench": Table(table, note=note),
        "by_category": Table(cat_rows),
        "radar": Image("MT-bench by category", uri=out["radar_uri"]),
        "pairwise": Table(
            [{"model": m, **s} for m, s in out["pairwise"].items()], empty="_no pairs_"
        ),
        "judge_health": metric_table(out["health"]),
    }
