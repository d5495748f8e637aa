"""Group `data`: ShareGPT raw -> cleaned FastChat JSONL -> tokenized SFT dataset.

Each asset composes its config, calls one step of `arenaflow.data`, and shows its counts, drop
reasons and plots as metadata; a check asserts that cleaning accounts for every input record.
"""

from typing import Any

import dagster as dg
import fsspec

from arenaflow import io
from arenaflow.data import run_clean, run_raw, run_sft
from arenaflow.tracking import redact
from pipelines.metadata import counts_md, md_table, mlflow_link, png_md
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "data"}
CODE_VERSION = source_version(__file__)


def _counts_meta(counts: dict[str, Any]) -> dict[str, Any]:
    dropped = counts.get("dropped", {})
    return {
        "input": counts["input"],
        "kept": counts["kept"],
        "dropped": sum(dropped.values()),
        "drop_reasons": counts_md(dropped) if dropped else dg.MetadataValue.md("_none dropped_"),
    }


@dg.asset(
    group_name="data",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"json"},
    description="ShareGPT conversations streamed from data.source; unusable records counted by reason.",
)
def sharegpt_raw(
    context: dg.AssetExecutionContext, hydra: HydraConfigResource, config: StageConfig
) -> dg.Output[dict[str, Any]]:
    """ShareGPT conversations streamed from data.source; unusable records counted by reason."""
    cfg, meta = stage_config(context, hydra, config)
    result = run_raw(cfg)
    counts = result["counts"]
    if counts["truncated"]:
        context.log.warning(
            f"source is cut off at char {counts['truncated_at_char']}: "
            f"{counts['truncated_tail_chars']} chars of an incomplete last record skipped"
        )
    return dg.Output(
        value={"uri": result["uri"], "count": counts["kept"], "counts": counts},
        metadata={
            **meta,
            **_counts_meta(counts),
            "source": redact(str(cfg.data.source)),
            "truncated": counts["truncated"],
            "truncated_tail_chars": counts["truncated_tail_chars"],
            "uri": dg.MetadataValue.path(result["uri"]),
            **mlflow_link(result["mlflow_url"]),
        },
    )


@dg.asset(
    group_name="data",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"json"},
    description="Cleaned FastChat JSONL: HTML to markdown, role fixes, blocked words, dedup and near-dedup.",
)
def sharegpt_clean(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    sharegpt_raw: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Cleaned FastChat JSONL: HTML to markdown, role fixes, blocked words, dedup and near-dedup."""
    cfg, meta = stage_config(context, hydra, config)
    result = run_clean(cfg, in_uri=sharegpt_raw["uri"])
    counts = result["counts"]
    notes = counts.get("notes", {})
    return dg.Output(
        value={
            "uri": result["uri"],
            "stats_uri": result["stats_uri"],
            "count": counts["kept"],
            "input": counts["input"],
            "kept": counts["kept"],
            "dropped": counts["dropped"],
        },
        metadata={
            **meta,
            **_counts_meta(counts),
            "notes": counts_md(notes, key="event") if notes else dg.MetadataValue.md("_none_"),
            "uri": dg.MetadataValue.path(result["uri"]),
            **mlflow_link(result["mlflow_url"]),
        },
    )


@dg.asset_check(
    asset=sharegpt_clean,
    description="kept + dropped == input: cleaning accounts for every record it read.",
    blocking=True,
)
def sharegpt_clean_accounts_for_every_record(sharegpt_clean: dict[str, Any]) -> dg.AssetCheckResult:
    """kept + dropped == input: cleaning accounts for every record it read."""
    stats = io.read_json(sharegpt_clean["stats_uri"])
    dropped = sum(stats["dropped"].values())
    passed = stats["kept"] + dropped == stats["input"]
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"input": stats["input"], "kept": stats["kept"], "dropped": dropped},
        description=None if passed else "some records were neither kept nor counted as dropped",
    )


@dg.asset(
    group_name="data",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"huggingface"},
    description="Tokenized train/validation SFT dataset with the model's chat template; labels only on assistant replies.",
)
def sft_dataset(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    sharegpt_clean: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Tokenized train/validation SFT dataset with the model's chat template."""
    cfg, meta = stage_config(context, hydra, config)
    result = run_sft(cfg, in_uri=sharegpt_clean["uri"])
    counts = result["counts"]
    with fsspec.open(result["plot_uri"], "rb") as f:
        png = f.read()
    summary = [
        {"field": k, "value": counts[k]}
        for k in (
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
    ]
    value_counts = {
        k: counts[k]
        for k in ("input", "kept", "dropped", "examples", "train", "validation", "dropped_pairs")
    }
    return dg.Output(
        value={"uri": result["uri"], "data_hash": result["data_hash"], "counts": value_counts},
        metadata={
            **meta,
            **_counts_meta(counts),
            "examples": counts["examples"],
            "trainable_fraction": float(counts["trainable_fraction"]),
            "data_hash": result["data_hash"],
            "summary": dg.MetadataValue.md(md_table(summary)),
            "length_histogram": png_md(png, "token lengths"),
            "uri": dg.MetadataValue.path(result["uri"]),
            **mlflow_link(result["mlflow_url"]),
        },
    )
