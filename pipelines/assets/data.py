"""Group `data`: ShareGPT raw -> cleaned FastChat JSONL -> tokenized SFT dataset.

Each asset composes its config, calls one step of `arenaflow.data`, and shows its counts, drop
reasons and plots as metadata; a check asserts that cleaning accounts for every input record.
"""

from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.data import run_clean, run_raw, run_sft
from arenaflow.data.tables import (
    clean_accounting,
    clean_output,
    raw_output,
    sft_output,
    truncation_warning,
)
from pipelines.metadata import check_result, output
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "data"}
CODE_VERSION = source_version(__file__)


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
    if warning := truncation_warning(result["counts"]):
        context.log.warning(warning)
    value, plain = raw_output(result, str(cfg.data.source))
    return output(value, meta, plain, mlflow_url=result["mlflow_url"])


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
    value, plain = clean_output(result)
    return output(value, meta, plain, mlflow_url=result["mlflow_url"])


@dg.asset_check(
    asset=sharegpt_clean,
    description="kept + dropped == input: cleaning accounts for every record it read.",
    blocking=True,
)
def sharegpt_clean_accounts_for_every_record(sharegpt_clean: dict[str, Any]) -> dg.AssetCheckResult:
    """kept + dropped == input: cleaning accounts for every record it read."""
    return check_result(clean_accounting(io.read_json(sharegpt_clean["stats_uri"])))


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
    value, plain = sft_output(result)
    return output(value, meta, plain, mlflow_url=result["mlflow_url"])
