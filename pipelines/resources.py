"""Dagster -> Hydra: a resource that composes `conf/` from overrides given in run config."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

import dagster as dg
from hydra.errors import HydraException
from omegaconf import DictConfig
from pydantic import Field

from arenaflow.config import compose_config
from arenaflow.redact import redact, redact_overrides, redacted_yaml


def default_overrides() -> list[str]:
    """`$ARENAFLOW_OVERRIDES` (shell-quoted), else the demo experiment (what `make run` uses)."""
    return shlex.split(os.environ.get("ARENAFLOW_OVERRIDES", "experiment=demo"))


class HydraConfigResource(dg.ConfigurableResource):
    """Composes the Hydra config tree; `overrides` apply to every asset of a run."""

    overrides: list[str] = Field(
        default_factory=default_overrides,
        description="Hydra overrides for every asset, e.g. ['experiment=demo', 'hardware=cpu_fsdp']",
    )

    def compose(self, extra: Sequence[str] = ()) -> DictConfig:
        return compose_config([*self.overrides, *extra])


class StageConfig(dg.Config):
    """Run config of one asset: Hydra overrides on top of the resource's, e.g. ['train.max_steps=20']."""

    overrides: list[str] = Field(
        default_factory=list, description="Hydra overrides for this asset only"
    )


def stage_config(
    context: dg.AssetExecutionContext, hydra: HydraConfigResource, config: StageConfig
) -> tuple[DictConfig, dict[str, dg.MetadataValue]]:
    """Compose the asset's config and the metadata that records it (resolved YAML + overrides)."""
    overrides = [*hydra.overrides, *config.overrides]
    shown = redact_overrides(overrides)
    context.log.info(f"Hydra overrides: {shown}")
    try:
        cfg = compose_config(overrides)
    except HydraException as e:  # Hydra quotes the override it rejects, secret and all
        raise ValueError(f"cannot compose the config from {shown}: {redact(str(e))}") from None
    yaml_text = redacted_yaml(cfg)
    return cfg, {
        "hydra_overrides": dg.MetadataValue.json(shown),
        "resolved_config": dg.MetadataValue.md(f"```yaml\n{yaml_text}```"),
    }
