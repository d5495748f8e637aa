"""Ratings from battles: online Elo, Bradley–Terry with bootstrap intervals, the leaderboard
(judge-only, human-only and combined, with judge-human agreement), and eval-gated promotion of the
registry's `champion` alias.

`stage.run(cfg)` is the stage entry point (`python -m arenaflow.rating`); the Dagster assets call its
three steps, `build_battles`, `build_leaderboard` and `promote_champion`, one per asset.

The steps live in `collect` (battles), `leaderboard` (with `fit`: one battle set rated) and
`promote`; the maths in `counts` (pair counts, outcome cells), `bradley_terry` (the likelihood and
its batched solvers), `ratings` (BT, bootstrap, intervals, Elo), `style` (style control),
`length_control`, `bias` and `agreement`; battle rows in `battles`; what a person sees in `tables`.
"""

from arenaflow.rating.agreement import judge_human_agreement
from arenaflow.rating.counts import battle_count_matrix, pair_counts, win_fraction_matrix
from arenaflow.rating.promote import decide, promote_champion
from arenaflow.rating.ratings import (
    bootstrap_intervals,
    ci_rank,
    compute_bootstrap_bt,
    compute_bt,
    compute_elo,
    predicted_win_rate,
)
from arenaflow.rating.stage import build_battles, build_leaderboard, run

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
