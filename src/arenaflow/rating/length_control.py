"""AlpacaEval 2's length-controlled win rate: each model's win probability against a baseline at
equal answer length, from a logistic fit of its scores on the length difference.

It reads the answers' token counts from the battles' `conv_metadata` (see `style`), so it needs
no second pass over the answers.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from arenaflow.answer_style import META_A, META_B, has_style, tally
from arenaflow.rating.bradley_terry import DEFAULT_L2
from arenaflow.rating.counts import HARD_SCORE


def _logistic_2(y: np.ndarray, x: np.ndarray, l2: float) -> tuple[float, float]:
    """(intercept, slope) of a logistic regression of scores y in [0, 1] on x, with an l2 prior."""
    theta = np.zeros(2)
    design = np.stack([np.ones_like(x), x], axis=1)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(design @ theta)))
        g = design.T @ (p - y) + l2 * theta
        h = design.T @ (design * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(h, g)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_controlled_win_rates(
    battles: pd.DataFrame, baseline: str, *, l2: float = DEFAULT_L2, soft: bool = False
) -> dict[str, dict[str, float | int]]:
    """AlpacaEval 2's length-controlled win rate against `baseline`, per model.

    For each model's battles with the baseline: a logistic fit of its score on the normalised
    length difference (model - baseline) / (sum + 1), standardised; the LC win rate is the fitted
    win probability at equal length (the intercept), beside the raw win rate and the length slope.
    Battles need conv_metadata (see `has_style`)."""
    out: dict[str, dict[str, float | int]] = {}
    if "conv_metadata" not in battles.columns:
        return out
    usable = battles[battles["conv_metadata"].map(has_style)]
    for model in sorted(set(usable["model_a"]) | set(usable["model_b"]) - {baseline}):
        as_a = (usable["model_a"] == model) & (usable["model_b"] == baseline)
        as_b = (usable["model_b"] == model) & (usable["model_a"] == baseline)
        sub = usable[as_a | as_b]
        if sub.empty:
            continue
        score = sub["winner"].map(HARD_SCORE).fillna(0.5).to_numpy(dtype=float)
        if soft and "score_a" in sub.columns:
            soft_a = pd.to_numeric(sub["score_a"], errors="coerce").to_numpy(dtype=float)
            score = np.where(np.isnan(soft_a), score, soft_a)
        flip = (sub["model_b"] == model).to_numpy()
        y = np.where(flip, 1.0 - score, score)
        meta = sub["conv_metadata"].tolist()
        own = np.array(
            [tally(m[META_B[0] if f else META_A[0]]) for m, f in zip(meta, flip, strict=True)]
        )
        other = np.array(
            [tally(m[META_A[0] if f else META_B[0]]) for m, f in zip(meta, flip, strict=True)]
        )
        diff = (own - other) / (own + other + 1.0)
        std = diff.std()
        x = (diff - diff.mean()) / std if std > 1e-12 else np.zeros_like(diff)
        intercept, slope = _logistic_2(y, x, l2)
        # at equal length the standardised difference is -mean / std, not 0
        at_equal = intercept + slope * ((0.0 - diff.mean()) / std if std > 1e-12 else 0.0)
        out[model] = {
            "battles": int(len(sub)),
            "win_rate": float(y.mean()),
            "lc_win_rate": float(1 / (1 + math.exp(-at_equal))),
            "length_slope": slope,
        }
    return out
