"""What the evaluate steps show a person: the asset value each step hands on, its metadata as
plain values and `arenaflow.report` tables, and the contamination check (the Dagster assets
convert them)."""

from __future__ import annotations

from typing import Any

from arenaflow.report import Path, Table, counts_table

DECONTAMINATION_FIGURES = (
    "ngram",
    "questions_checked",
    "conversations_scanned",
    "overlapping_conversations",
    "contaminated_share",
    "threshold",
)


def questions_output(out: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of the questions step: the file, its source and questions per category."""
    rows = [{"category": k, "questions": v} for k, v in sorted(out["categories"].items())]
    value = {k: out[k] for k in ("uri", "count", "question_ids")}
    return value, {
        "uri": Path(out["uri"]),
        "source": out["source"],
        "count": out["count"],
        "question_ids": out["question_ids"],
        "categories": Table(rows),
        "skipped_records": counts_table(out["skipped"] or {"none": 0}),
    }


def answers_output(out: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of one competitor's answers: counts, failures, speed and samples."""
    failures = [{"question_id": f["question_id"], "error": f["error"]} for f in out["failures"]]
    value = {k: out[k] for k in ("uri", "model_id", "answered", "failed")}
    return value, {
        "uri": Path(out["uri"]),
        "model": str(out["model"]),
        "answers": out["answered"],
        **{k: out[k] for k in ("generated", "reused", "failed", "tokens_generated")},
        "failures": Table(failures, empty="_none_"),
        "tokens_per_s": float(out["tokens_per_s"]),
        "sample_answers": Table(out["samples"]),
    }


def decontamination_output(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of the decontamination report: overlap figures and the conversations."""
    listed = [
        {
            **c,
            "question_ids": ", ".join(map(str, c["question_ids"])),
            "sources": ", ".join(c["sources"]),
        }
        for c in report["conversations"]
    ]
    value = {k: report[k] for k in ("uri", "contaminated_question_ids", "contaminated_share")}
    return value, {
        "uri": Path(report["uri"]),
        **{k: report[k] for k in DECONTAMINATION_FIGURES},
        "contaminated_question_ids": report["contaminated_question_ids"],
        "overlapping_conversations_listed": Table(listed, empty="_none_"),
        "skipped_records": counts_table(report["skipped"] or {"none": 0}),
    }


def contamination_check(report: dict[str, Any]) -> dict[str, Any]:
    """`{passed, severity, description, metadata}`: the share of questions that overlap the SFT data stays
    at or below `evaluate.decontamination.threshold` (a warning, not a stop)."""
    return {
        "passed": not report["above_threshold"],
        "severity": "warn",
        "description": f"{report['contaminated_share']:.1%} of MT-bench questions share "
        f"{report['ngram']}-grams with the SFT data (threshold {report['threshold']:.1%})",
        "metadata": {
            "contaminated_share": report["contaminated_share"],
            "contaminated_question_ids": report["contaminated_question_ids"],
        },
    }
