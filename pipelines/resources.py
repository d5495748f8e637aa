"""Dagster -> Hydra: a resource that composes `conf/` from overrides given in run config."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

import dagster as dg
from omegaconf import DictConfig
from pydantic import Field

from arenaflow.config import compose_config, to_yaml
from arenaflow.tracking import redact


def default_overrides() -> list[str]:
    """`$ARENAFLOW_OVERRIDES` (shell-quoted), else the demo experiment (what `make run` uses)."""
    return shlex.split(os.environ.get("ARENAFLOW_OVERRIDES", "experiment=demo"))


def redact_overrides(overrides: Sequence[str]) -> list[str]:
    """`serve.api_keys=[sk-..]` -> `serve.api_keys=***`: overrides are shown, secrets are not."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        leaf = key.lstrip("+~").rsplit(".", 1)[-1]
        out.append(f"{key}={redact({leaf: value})[leaf]}" if sep else o)
    return out


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
    context.log.info("Hydra overrides: %s", overrides)
    cfg = compose_config(overrides)
    from omegaconf import OmegaConf

    from arenaflow.tracking import config_container

    yaml_text = to_yaml(OmegaConf.create(config_container(cfg)))
    return cfg, {
        "hydra_overrides": dg.MetadataValue.json(redact_overrides(overrides)),
        "resolved_config": dg.MetadataValue.md(f"```yaml\n{yaml_text}```"),
    }
