"""The rating stage: battles -> leaderboard -> champion, each step a function the Dagster asset of
the same name calls (`collect.build_battles`, `leaderboard.build_leaderboard`,
`promote.promote_champion`), and `run(cfg)` chaining all three for `python -m arenaflow.rating`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.rating.collect import build_battles
from arenaflow.rating.leaderboard import build_leaderboard
from arenaflow.rating.promote import TAG_ROLE, promote_champion
from arenaflow.tracking import tracker_from_cfg

__all__ = ["build_battles", "build_leaderboard", "promote_champion", "run"]


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
