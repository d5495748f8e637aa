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
from arenaflow.rating.promote import TAG_ROLE, decide, promote_champion
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

    The finetuned competitor is the newest version of `tracking.registered_model_name` that is not
    the base, the base competitor the newest version tagged `arenaflow.role=base`; MT-bench scores
    come from the single-grading judgments and the judge's calibration from its summary file,
    when those files exist.
    """
    from arenaflow.judge.scores import single_scores
    from arenaflow.judge.stage import calibration_uris, judgment_uris

    single_uri, pair_uri = judgment_uris(cfg)
    summary_uri = calibration_uris(cfg)[1]
    judgments = {
        "pair_uri": pair_uri,
        "judge_model": str(cfg.judge.model_name),
        "calibration": io.read_json(summary_uri) if io.exists(summary_uri) else None,
    }
    battles = build_battles(cfg, judgments)
    scores = {"scores": single_scores(io.read_jsonl(single_uri))} if io.exists(single_uri) else None
    leaderboard = build_leaderboard(cfg, battles, scores)
    name = str(cfg.tracking.registered_model_name)
    versions = tracker_from_cfg(cfg).latest_versions(name)

    def newest(base: bool) -> dict[str, Any] | None:
        found = [v for v in versions if (v.tags.get(TAG_ROLE) == "base") == base]
        return (
            {"model_uri": f"models:/{name}/{found[-1].version}", "version": found[-1].version}
            if found
            else None
        )

    champion = promote_champion(cfg, leaderboard, newest(False), newest(True))
    return {
        "battles": {k: battles[k] for k in ("uri", "count", "by_source", "by_origin", "invalid")},
        "leaderboard": {"uri": leaderboard["uri"], "rows": leaderboard["rows"]},
        "champion": champion,
    }
