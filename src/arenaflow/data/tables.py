"""What the data steps show a person: the asset value each step hands on, and its metadata as
plain values and `arenaflow.report` tables (the Dagster assets convert them)."""

from __future__ import annotations

from typing import Any

from arenaflow.redact import redact
from arenaflow.report import Image, Markdown, Path, Table, counts_table

SFT_SUMMARY = (
    "examples",
    "train",
    "validation",
    "split_conversations",
    "dropped_pairs",
    "tokens",
    "trainable_tokens",
    "trainable_fraction",
    "max_length",
)
SFT_VALUE_COUNTS = ("input", "kept", "dropped", "examples", "train", "validation", "dropped_pairs")


def counts_metadata(counts: dict[str, Any]) -> dict[str, Any]:
    """Records in, kept and dropped, with the drop reasons."""
    dropped = counts.get("dropped", {})
    return {
        "input": counts["input"],
        "kept": counts["kept"],
        "dropped": sum(dropped.values()),
        "drop_reasons": counts_table(dropped) if dropped else Markdown("_none dropped_"),
    }


def truncation_warning(counts: dict[str, Any]) -> str | None:
    """Why the last record of a cut-off source was skipped, or None."""
    if not counts["truncated"]:
        return None
    return (
        f"source is cut off at char {counts['truncated_at_char']}: "
        f"{counts['truncated_tail_chars']} chars of an incomplete last record skipped"
    )


def raw_output(result: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of the raw step; `source` is shown with its secrets redacted."""
    counts = result["counts"]
    value = {"uri": result["uri"], "count": counts["kept"], "counts": counts}
    return value, {
        **counts_metadata(counts),
        "source": redact(source),
        "truncated": counts["truncated"],
        "truncated_tail_chars": counts["truncated_tail_chars"],
        "uri": Path(result["uri"]),
    }


def clean_output(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of the cleaning step: counts, drop reasons and cleaning events."""
    counts = result["counts"]
    notes = counts.get("notes", {})
    value = {
        "uri": result["uri"],
        "stats_uri": result["stats_uri"],
        "count": counts["kept"],
        "input": counts["input"],
        "kept": counts["kept"],
        "dropped": counts["dropped"],
    }
    return value, {
        **counts_metadata(counts),
        "notes": counts_table(notes, key="event") if notes else Markdown("_none_"),
        "uri": Path(result["uri"]),
    }


def clean_accounting(stats: dict[str, Any]) -> dict[str, Any]:
    """kept + dropped == input: `{passed, metadata, description}` for the cleaning check."""
    dropped = sum(stats["dropped"].values())
    passed = stats["kept"] + dropped == stats["input"]
    return {
        "passed": passed,
        "metadata": {"input": stats["input"], "kept": stats["kept"], "dropped": dropped},
        "description": None if passed else "some records were neither kept nor counted as dropped",
    }


def sft_output(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(value, metadata) of the SFT step: counts, token summary and the length histogram."""
    counts = result["counts"]
    value = {
        "uri": result["uri"],
        "data_hash": result["data_hash"],
        "counts": {k: counts[k] for k in SFT_VALUE_COUNTS},
    }
    return value, {
        **counts_metadata(counts),
        "examples": counts["examples"],
        "trainable_fraction": float(counts["trainable_fraction"]),
        "data_hash": result["data_hash"],
        "summary": Table([{"field": k, "value": counts[k]} for k in SFT_SUMMARY]),
        "length_histogram": Image("token lengths", uri=result["plot_uri"]),
        "uri": Path(result["uri"]),
    }
