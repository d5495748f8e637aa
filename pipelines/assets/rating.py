"""Dagster assets of the rating group: battles, the leaderboard, and the eval-gated `champion`
alias. Each calls one step of `arenaflow.rating`, the library `python -m arenaflow.rating` runs.
The vote sensor refreshes battles + leaderboard when the arena has collected enough new votes."""

from typing import Any

import dagster as dg

from arenaflow.arena import VoteStore, database_exists, safe_url, vote_db_url
from arenaflow.rating import build_battles, build_leaderboard, promote_champion
from arenaflow.rating.tables import (
    BATTLES_VALUE,
    CHAMPION_VALUE,
    LEADERBOARD_VALUE,
    battles_metadata,
    champion_metadata,
    leaderboard_metadata,
)
from pipelines.metadata import output
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "rating"}
CODE_VERSION = source_version(__file__)


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"python"},
    description="Battles (FastChat columns, source judge|human) from pairwise judgments by the swap rule, external battle files and the arena's human votes.",
)
def battles(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    mt_bench_judgments: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Battles (FastChat columns, source judge|human) from pairwise judgments by the swap rule,
    external battle files and the arena's human votes."""
    cfg, meta = stage_config(context, hydra, config)
    out = build_battles(cfg, mt_bench_judgments)
    context.log.info("human votes: %s", out["human_votes"]["note"])
    value = {k: out[k] for k in BATTLES_VALUE}
    return output(value, meta, battles_metadata(out), mlflow_url=out.get("run_url"))


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"python", "mlflow"},
    description="Leaderboard: Bradley–Terry rating with bootstrap CI (judge-only, human-only, combined), online Elo, CI-aware rank, MT-bench score, win rate, judge-human agreement.",
)
def leaderboard(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    battles: dict[str, Any],
    mt_bench_scores: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Leaderboard: Bradley–Terry rating with bootstrap CI (judge-only, human-only, combined),
    online Elo, CI-aware rank, MT-bench score, win rate, judge-human agreement."""
    cfg, meta = stage_config(context, hydra, config)
    out = build_leaderboard(cfg, battles, mt_bench_scores)
    value = {k: out[k] for k in LEADERBOARD_VALUE}
    return output(value, meta, leaderboard_metadata(out), mlflow_url=out.get("run_url"))


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"mlflow"},
    description="The registry alias `champion`: the base first, then a challenger that beats it in a paired bootstrap comparison judged by a calibrated judge.",
)
def champion_model(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    leaderboard: dict[str, Any],
    finetuned_model: dict[str, Any],
    base_model: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """The registry alias `champion`: the base first, then a challenger that beats it in a paired
    bootstrap comparison judged by a calibrated judge (rule: arenaflow.rating.promote)."""
    cfg, meta = stage_config(context, hydra, config)
    out = promote_champion(cfg, leaderboard, finetuned_model, base_model)
    context.log.info("champion: %s", out["reason"])
    value = {k: out[k] for k in CHAMPION_VALUE}
    return output(value, meta, champion_metadata(out), mlflow_url=out.get("run_url"))


rating_refresh_job = dg.define_asset_job(
    "rating_refresh_job",
    selection=dg.AssetSelection.assets(battles, leaderboard),
    description="Re-rate with the newest arena votes: battles + leaderboard (promotion waits for a full run).",
)


@dg.sensor(
    job=rating_refresh_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Refreshes battles + leaderboard once rating.vote_sensor.min_new_votes new arena votes have arrived.",
)
def arena_votes_sensor(
    context: dg.SensorEvaluationContext, hydra: HydraConfigResource
) -> dg.RunRequest | dg.SkipReason:
    """Refreshes battles + leaderboard once `rating.vote_sensor.min_new_votes` new arena votes
    have arrived; the cursor is the vote count of the last requested run (votes are never deleted)."""
    cfg = hydra.compose()
    if not cfg.rating.human_votes:
        return dg.SkipReason("rating.human_votes=false: human votes are not rated")
    url = vote_db_url(cfg)
    if not database_exists(url):
        return dg.SkipReason(f"no vote database at {safe_url(url)} yet")
    for key in ("mt_bench_judgments", "mt_bench_scores"):
        if context.instance.get_latest_materialization_event(dg.AssetKey(key)) is None:
            return dg.SkipReason(
                f"{key} was never materialized; run the pipeline once, then new votes refresh "
                "the leaderboard"
            )
    store = VoteStore(url)
    try:
        total = store.count()
    finally:
        store.dispose()
    seen = int(context.cursor or 0)
    if total < seen:  # the database was replaced: count from its start
        seen = 0
    need = int(cfg.rating.vote_sensor.min_new_votes)
    if total - seen < need:
        return dg.SkipReason(
            f"{total - seen} new vote(s) since the last refresh ({total} in all); waiting for {need}"
        )
    context.update_cursor(str(total))
    context.log.info("%d new arena votes: refreshing battles + leaderboard", total - seen)
    return dg.RunRequest(
        tags={"arenaflow/votes": str(total), "arenaflow/new_votes": str(total - seen)}
    )


jobs = [rating_refresh_job]
sensors = [arena_votes_sensor]
