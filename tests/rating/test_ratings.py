"""Elo, Bradley–Terry and the bootstrap on hand-made battle sets whose answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq, minimize

from arenaflow.rating import (
    battle_count_matrix,
    bootstrap_intervals,
    ci_rank,
    compute_bootstrap_bt,
    compute_bt,
    compute_elo,
    predicted_win_rate,
    win_fraction_matrix,
)

CASES = Path(__file__).parent / "cases"


def frame(spec: list[list]) -> pd.DataFrame:
    rows = []
    for a, b, winner, *n in spec:
        rows += [{"model_a": a, "model_b": b, "winner": winner}] * (n[0] if n else 1)
    return pd.DataFrame(rows)


def synthetic(n: int, strengths: np.ndarray, tie_rate: float = 0.1, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    m = len(strengths)
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    p = 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400))
    u, t = rng.random(n), rng.random(n) < tie_rate
    names = np.array([f"m{i}" for i in range(m)])
    winner = np.where(t, "tie", np.where(u < p, "model_a", "model_b"))
    return pd.DataFrame({"model_a": names[a], "model_b": names[b], "winner": winner})


@pytest.mark.parametrize(
    "case", json.loads((CASES / "bt.json").read_text()), ids=lambda c: c["name"]
)
def test_bt_known_answers(case: dict) -> None:
    kw = {k: case[k] for k in ("scale", "base", "init_rating") if k in case}
    got = compute_bt(frame(case["battles"]), anchor=case.get("anchor"), l2=case["l2"], **kw)
    for model, rating in case["expected"].items():
        assert got[model] == pytest.approx(rating, abs=1e-5)


def test_three_to_one_is_400_log10_3() -> None:
    r = compute_bt(frame([["x", "y", "model_a", 3], ["x", "y", "model_b", 1]]), l2=0)
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert list(r.index) == ["x", "y"]


def test_l2_prior_matches_its_closed_form_on_a_clean_sweep() -> None:
    # 6 wins, l2 = 0.5: strengths +-b with b = 12 ln10 sigmoid(-2 ln10 b).
    ln10 = math.log(10)
    b = brentq(lambda b: b - 12 * ln10 / (1 + math.exp(2 * ln10 * b)), 0, 5)
    r = compute_bt(frame([["x", "y", "model_a", 6]]), l2=0.5)
    assert r["x"] == pytest.approx(1000 + 400 * b, abs=1e-4)
    assert r["y"] == pytest.approx(1000 - 400 * b, abs=1e-4)


def test_bt_matches_a_generic_optimizer() -> None:
    df = synthetic(3000, np.array([0.0, 80.0, -120.0, 200.0, 30.0]), seed=3)
    ours = compute_bt(df, l2=0.5)
    models = sorted(ours.index)
    idx = {m: i for i, m in enumerate(models)}
    a, b = df["model_a"].map(idx).to_numpy(), df["model_b"].map(idx).to_numpy()
    sa = df["winner"].map({"model_a": 1.0, "model_b": 0.0, "tie": 0.5}).to_numpy()

    def loss(beta: np.ndarray) -> float:
        d = math.log(10) * (beta[a] - beta[b])
        return float(
            (sa * np.logaddexp(0, -d) + (1 - sa) * np.logaddexp(0, d)).sum() + 0.25 * beta @ beta
        )

    ref = minimize(loss, np.zeros(len(models)), method="BFGS", options={"gtol": 1e-9}).x
    for m in models:
        assert ours[m] == pytest.approx(1000 + 400 * ref[idx[m]], abs=0.01)


@pytest.mark.parametrize(
    "case", json.loads((CASES / "elo.json").read_text()), ids=lambda c: c["name"]
)
def test_elo_known_answers(case: dict) -> None:
    got = compute_elo(frame(case["battles"]), k=case.get("k", 4))
    assert got == pytest.approx(case["expected"], abs=1e-4)


def test_bad_winner_names_the_fix() -> None:
    with pytest.raises(ValueError, match="winner outside"):
        compute_bt(frame([["x", "y", "model_c"]]))
    with pytest.raises(ValueError, match="anchor model 'z' has no battles"):
        compute_bt(frame([["x", "y", "model_a"]]), anchor=("z", 1000))


def test_bootstrap_reproducible_with_seed_and_brackets_the_estimate() -> None:
    df = synthetic(2000, np.array([0.0, 100.0, -100.0, 50.0]), seed=1)
    one = compute_bootstrap_bt(df, num_round=120, seed=7, chunk_rounds=50)
    two = compute_bootstrap_bt(df, num_round=120, seed=7, chunk_rounds=50)
    other = compute_bootstrap_bt(df, num_round=120, seed=8, chunk_rounds=50)
    pd.testing.assert_frame_equal(one, two)
    assert not one.equals(other)
    assert one.shape == (120, 4) and list(one.columns) == list(
        one.median().sort_values(ascending=False).index
    )
    ci = bootstrap_intervals(one)
    point = compute_bt(df)
    assert ((ci["lower"] < point[ci.index]) & (point[ci.index] < ci["upper"])).all()
    assert np.allclose(one.mean(axis=1), 1000.0)  # unanchored rounds average init_rating


def test_bootstrap_on_counts_matches_resampling_rows() -> None:
    """Multinomial draws of (pair, outcome) counts have the law of resampling battle rows."""
    df = synthetic(1500, np.array([0.0, 60.0, -90.0]), seed=2)
    ours = compute_bootstrap_bt(df, num_round=300, seed=0).std()
    rng = np.random.default_rng(0)
    rows = [compute_bt(df.iloc[rng.integers(0, len(df), len(df))]) for _ in range(150)]
    naive = pd.DataFrame(rows).std()
    for m in ours.index:
        assert ours[m] == pytest.approx(naive[m], rel=0.25)


def test_bootstrap_anchor_pins_the_anchor() -> None:
    df = synthetic(500, np.array([0.0, 100.0, -100.0]), seed=4)
    boot = compute_bootstrap_bt(df, num_round=40, seed=0, anchor=("m0", 1200))
    assert np.allclose(boot["m0"], 1200.0) and boot["m1"].median() > 1200.0


def test_ci_rank() -> None:
    lower = pd.Series({"a": 1100.0, "b": 1050.0, "c": 990.0, "d": 900.0})
    upper = pd.Series({"a": 1200.0, "b": 1150.0, "c": 1060.0, "d": 980.0})
    assert ci_rank(lower, upper).to_dict() == {"a": 1, "b": 1, "c": 2, "d": 4}


def test_matrices() -> None:
    df = frame(
        [
            ["x", "y", "model_a", 2],
            ["y", "x", "model_a", 1],
            ["x", "y", "tie", 1],
            ["x", "z", "model_b", 1],
        ]
    )
    counts = battle_count_matrix(df)
    assert counts.loc["x", "y"] == counts.loc["y", "x"] == 4 and counts.loc["y", "z"] == 0
    frac = win_fraction_matrix(df)
    assert frac.loc["x", "y"] == pytest.approx(0.5) and frac.loc["y", "x"] == pytest.approx(0.25)
    assert frac.loc["z", "x"] == 1.0 and np.isnan(frac.loc["y", "z"])
    pred = predicted_win_rate({"x": 1400.0, "y": 1000.0})
    assert pred.loc["x", "y"] == pytest.approx(10 / 11) and pred.loc["y", "x"] == pytest.approx(
        1 / 11
    )
    assert np.isnan(pred.loc["x", "x"])


def test_soft_outcomes_weigh_each_battle_by_its_expected_score() -> None:
    from arenaflow.rating.battles import soft_score

    # both orders favour model_1 with 0.7 (+ half of 0.1 tie): its expected score is 0.75
    row = {"g1_probs": {"A": 0.7, "B": 0.2, "C": 0.1}, "g2_probs": {"A": 0.2, "B": 0.7, "C": 0.1}}
    assert soft_score(row) == pytest.approx(0.75)
    assert soft_score({"g1_probs": {"A": 1.0}}) is None  # one order only: no soft outcome
    assert soft_score({"g1_probs": {"A": -1}, "g2_probs": {"B": 1}}) is None
    df = pd.DataFrame(
        [{"model_a": "a", "model_b": "b", "winner": "model_a", "score_a": 0.75}] * 40
        + [{"model_a": "b", "model_b": "a", "winner": "model_b", "score_a": 0.25}] * 40
    )
    hard = compute_bt(df, anchor=("b", 1000), l2=0.0)
    soft = compute_bt(df, anchor=("b", 1000), l2=0.0, soft=True)
    # soft: P(a beats b) = 0.75 exactly -> 400 * log10(3) points; hard: a won every battle
    assert soft["a"] - 1000 == pytest.approx(400 * np.log10(3), abs=0.01)
    assert hard["a"] - 1000 > 1000
    # battles without a score_a (human votes, one-order judgments) count by their winner: with
    # none set, the soft fit is the hard one
    plain = df.iloc[:60].copy()
    plain["score_a"] = np.nan
    plain.loc[::3, "winner"] = "tie"
    pd.testing.assert_series_equal(
        compute_bt(plain, anchor=("b", 1000), soft=True), compute_bt(plain, anchor=("b", 1000))
    )
    # soft bootstrap rounds resample battles: the interval of a mixed set has width
    mixed = df.copy()
    mixed.loc[::4, "score_a"] = 0.4
    boot = compute_bootstrap_bt(mixed, 200, 1, anchor=("b", 1000), soft=True)
    assert boot["a"].quantile(0.975) - boot["a"].quantile(0.025) > 1.0
