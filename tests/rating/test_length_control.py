"""The length-controlled win rate (AlpacaEval 2's idea) on battles whose answer lengths are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from arenaflow.rating.length_control import length_controlled_win_rates


def test_length_controlled_win_rate_removes_the_length_advantage() -> None:
    """A model exactly as strong as the baseline but twice as long: its raw win rate is inflated
    by the judge's taste for length; at equal length it is a coin flip."""
    rng = np.random.default_rng(5)
    n = 4000
    rows = []
    for _ in range(n):
        long_side = rng.random() < 0.5
        tok_model = int(rng.uniform(300, 900))
        tok_base = int(rng.uniform(150, 450))
        diff = (tok_model - tok_base) / (tok_model + tok_base + 1)
        won = rng.random() < 1 / (1 + math.exp(-3.0 * diff))  # strength equal, length rewarded
        a, b = ("model", "base") if long_side else ("base", "model")
        ta, tb = (tok_model, tok_base) if long_side else (tok_base, tok_model)
        winner = (
            ("model_a" if long_side else "model_b")
            if won
            else ("model_b" if long_side else "model_a")
        )
        meta = {
            "sum_assistant_a_tokens": ta,
            "header_count_a": {},
            "list_count_a": {},
            "bold_count_a": {},
            "sum_assistant_b_tokens": tb,
            "header_count_b": {},
            "list_count_b": {},
            "bold_count_b": {},
        }
        rows.append({"model_a": a, "model_b": b, "winner": winner, "conv_metadata": meta})
    lc = length_controlled_win_rates(pd.DataFrame(rows), "base")["model"]
    assert lc["battles"] == n
    assert lc["win_rate"] > 0.65
    assert lc["lc_win_rate"] == pytest.approx(0.5, abs=0.05)
    assert lc["length_slope"] > 0
