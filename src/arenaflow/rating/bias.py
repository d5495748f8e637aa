"""Judge bias in the open: how much a judge rewards length, the first position and itself.

Figures from the judge's own battles: the length coefficient of its style-controlled fit (logit
per standard deviation of length difference), the share of decisive games it gave to the answer
shown first (0.5 is unbiased; a Wilson interval says whether the gap is noise), and, when the
judge is also a competitor, its rating by the judge minus its rating by human voters.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def position_preference(judged: pd.DataFrame) -> dict[str, Any]:
    """Share of decisive games won by the answer shown first (g1 shows model_1 first, g2 model_2)."""
    if judged.empty or not {"g1_winner", "g2_winner"} <= set(judged.columns):
        return {"games": 0, "first_share": None, "interval": None, "biased": None}
    first = int((judged["g1_winner"] == "model_1").sum() + (judged["g2_winner"] == "model_2").sum())
    second = int(
        (judged["g1_winner"] == "model_2").sum() + (judged["g2_winner"] == "model_1").sum()
    )
    n = first + second
    if n == 0:
        return {"games": 0, "first_share": None, "interval": None, "biased": None}
    lo, hi = wilson(first, n)
    return {
        "games": n,
        "first_share": first / n,
        "interval": [lo, hi],
        "biased": not lo <= 0.5 <= hi,
    }


def judge_bias(
    judged: pd.DataFrame,
    judge_style: dict[str, Any] | None,
    judge_model: str | None,
    judge_rows: dict[str, dict[str, Any]],
    human_rows: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The judge-health figures of one leaderboard (see the module docstring)."""
    length = None
    if judge_style and judge_style.get("on"):
        length = (judge_style.get("coefficients") or {}).get("length")
    self_pref: dict[str, Any] = {"competitor": bool(judge_model and judge_model in judge_rows)}
    if self_pref["competitor"] and judge_model in human_rows:
        gap = judge_rows[judge_model]["rating"] - human_rows[judge_model]["rating"]
        self_pref["judge_minus_human"] = float(gap)
    return {
        "length_preference": length,
        "length_note": "style-controlled judge fit" if length else "no style fit of judge battles",
        "position_preference": position_preference(judged),
        "self_preference": self_pref,
    }
