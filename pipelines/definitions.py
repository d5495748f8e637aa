"""The one `Definitions` of the arenaflow code location (`dagster dev -w dagster_workspace.yaml`).

Each module in `pipelines.assets` holds one stage group's assets and asset checks, and may expose
`jobs` and `sensors` lists; this file only collects them.
"""

from __future__ import annotations

import importlib

import dagster as dg

from pipelines.resources import HydraConfigResource

STAGE_MODULES = ["data", "train", "evaluate", "judge", "rating", "serve"]


def _stage_modules() -> list:
    mods = []
    for name in STAGE_MODULES:
        try:
            mods.append(importlib.import_module(f"pipelines.assets.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"pipelines.assets.{name}":
                raise
    return mods


def build_definitions() -> dg.Definitions:
    modules = _stage_modules()
    assets = dg.load_assets_from_modules(modules)
    groups = sorted({g for a in assets for g in a.group_names_by_key.values()})
    group_jobs = [
        dg.define_asset_job(
            f"{g}_job",
            selection=dg.AssetSelection.groups(g),
            description=f"Materialize the {g} group",
        )
        for g in groups
    ]
    return dg.Definitions(
        assets=assets,
        asset_checks=dg.load_asset_checks_from_modules(modules),
        jobs=[*group_jobs, *(j for m in modules for j in getattr(m, "jobs", []))],
        sensors=[s for m in modules for s in getattr(m, "sensors", [])],
        resources={"hydra": HydraConfigResource()},
    )


defs = build_definitions()
