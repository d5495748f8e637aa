"""Ratings from battles: online Elo, Bradley–Terry with bootstrap intervals, the leaderboard
(judge-only, human-only and combined, with judge-human agreement), and eval-gated promotion of the
registry's `champion` alias.

`run(cfg)` is the stage entry point (`python -m arenaflow.rating`); the Dagster assets call its
three steps, `build_battles`, `build_leaderboard` and `promote_champion`, one per asset.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.rating.agreement import judge_human_agreement
from arenaflow.rating.promote import decide, promote_champion
from arenaflow.rating.ratings import (
    battle_count_matrix,
    bootstrap_intervals,
    ci_rank,
    compute_bootstrap_bt,
    compute_bt,
    compute_elo,
    pair_counts,
    predicted_win_rate,
    win_fraction_matrix,
)
from arenaflow.rating.stage import build_battles, build_leaderboard
from arenaflow.tracking import tracker_from_cfg

log = logging.getLogger(__name__)

__all__ = [
    "battle_count_matrix",
    "bootstrap_intervals",
    "build_battles",
    "build_leaderboard",
    "ci_rank",
    "compute_bootstrap_bt",
    "compute_bt",
    "compute_elo",
    "decide",
    "judge_human_agreement",
    "pair_counts",
    "predicted_win_rate",
    "promote_champion",
    "run",
    "win_fraction_matrix",
]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Battles, leaderboard and champion from the judge stage's files in the FastChat layout.

    The finetuned competitor is the newest version of `tracking.registered_model_name`; MT-bench
    scores come from the single-grading judgments when that file exists.
    """
    from arenaflow.judging.scores import single_scores
    from arenaflow.judging.stage import judgment_uris

    single_uri, pair_uri = judgment_uris(cfg)
    judgments = {"pair_uri": pair_uri, "judge_model": str(cfg.judge.model_name)}
    battles = build_battles(cfg, judgments)
    scores = {"scores": single_scores(io.read_jsonl(single_uri))} if io.exists(single_uri) else None
    leaderboard = build_leaderboard(cfg, battles, scores)
    tracker = tracker_from_cfg(cfg)
    versions = tracker.latest_versions(str(cfg.tracking.registered_model_name))
    name = cfg.tracking.registered_model_name
    finetuned = (
        {"model_uri": f"models:/{name}/{versions[-1].version}", "version": versions[-1].version}
        if versions
        else None
    )
    champion = promote_champion(cfg, leaderboard, finetuned)
    return {
        "battles": {k: battles[k] for k in ("uri", "count", "by_source", "by_origin", "invalid")},
        "leaderboard": {"uri": leaderboard["uri"], "rows": leaderboard["rows"]},
        "champion": champion,
    }
