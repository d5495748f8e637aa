"""Style control: answers' style counts, the contextual Bradley–Terry fit, and the leaderboard."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from arenaflow import io
from arenaflow.answer_style import answer_style, conv_metadata
from arenaflow.evaluate.answers import answer_uri
from arenaflow.judge.stage import judgment_uris
from arenaflow.rating import build_battles, build_leaderboard, compute_bt
from arenaflow.rating.bias import position_preference
from arenaflow.rating.sandwich import sandwich_style_intervals
from arenaflow.rating.style import (
    compute_bootstrap_style_bt,
    compute_style_bt,
    style_design,
)

MARKDOWN = """# Title
Some **bold** text and __more__.

## Steps
1. first
2. second
- a bullet
* another

```python
# not a header
- not a list
**not bold**
```
"""


def test_answer_style_counts_markdown_outside_code() -> None:
    s = answer_style(MARKDOWN)
    assert s["header_count"]["h1"] == 1 and s["header_count"]["h2"] == 1
    assert sum(s["header_count"].values()) == 2
    assert s["list_count"] == {"ordered": 2, "unordered": 2}
    assert s["bold_count"] == {"**": 1, "__": 1}
    assert s["code_blocks"] == 1 and s["tokens"] > 30
    meta = conv_metadata([s, answer_style("short")], [answer_style("x")])
    assert meta["sum_assistant_a_tokens"] == s["tokens"] + 1
    assert meta["list_count_a"] == {"ordered": 2, "unordered": 2} and meta["list_count_b"] == {
        "ordered": 0,
        "unordered": 0,
    }


def test_style_regexes_are_linear_on_hostile_text() -> None:
    import time

    t0 = time.perf_counter()
    answer_style("`" * 50_000 + "**" * 20_000 + "\n- " * 10_000 + "#" * 30_000)
    assert time.perf_counter() - t0 < 2.0


def _synthetic(n: int, seed: int, length_coef: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """Strength alone decides the truth; the judge also rewards length. `verbose` is the weakest
    model but writes long answers; `terse` is the strongest with short ones."""
    rng = np.random.default_rng(seed)
    names = ["terse", "mid", "plain", "verbose"]
    strength = {"terse": 0.6, "mid": 0.3, "plain": 0.0, "verbose": -0.2}
    length = {"terse": 80, "mid": 200, "plain": 250, "verbose": 900}
    a = rng.integers(0, 4, n)
    b = (a + rng.integers(1, 4, n)) % 4
    la = np.array([length[names[i]] for i in a]) * rng.uniform(0.5, 1.5, n)
    lb = np.array([length[names[i]] for i in b]) * rng.uniform(0.5, 1.5, n)
    diff = (la - lb) / (la + lb + 1)
    z_style = (diff - diff.mean()) / diff.std()
    sa = np.array([strength[names[i]] for i in a])
    sb = np.array([strength[names[i]] for i in b])
    p = 1 / (1 + np.exp(-(math.log(10) * (sa - sb) + length_coef * z_style)))
    winner = np.where(rng.random(n) < p, "model_a", "model_b")
    meta = [
        {
            "sum_assistant_a_tokens": int(la[k]),
            "header_count_a": {"h1": int(rng.integers(0, 3))},
            "list_count_a": {"ordered": int(rng.integers(0, 4))},
            "bold_count_a": {"**": int(rng.integers(0, 3))},
            "sum_assistant_b_tokens": int(lb[k]),
            "header_count_b": {"h1": int(rng.integers(0, 3))},
            "list_count_b": {"ordered": int(rng.integers(0, 4))},
            "bold_count_b": {"**": int(rng.integers(0, 3))},
        }
        for k in range(n)
    ]
    df = pd.DataFrame(
        {
            "model_a": [names[i] for i in a],
            "model_b": [names[i] for i in b],
            "winner": winner,
            "conv_metadata": meta,
        }
    )
    return df, strength


def test_style_control_recovers_the_true_order_raw_does_not() -> None:
    df, strength = _synthetic(6000, seed=1, length_coef=1.2)
    truth = sorted(strength, key=strength.get, reverse=True)
    raw = compute_bt(df)
    assert list(raw.index) != truth  # the long answers bought `verbose` places
    assert raw["verbose"] > raw["plain"]
    fit = compute_style_bt(df)
    assert list(fit.ratings.index) == truth
    assert fit.coefficients["length"] == pytest.approx(1.2, abs=0.15)  # simulated sign and size
    for other in ("headers", "lists", "bold"):
        assert abs(fit.coefficients[other]) < 0.1  # the judge ignored them
    # strengths on the 400-point scale: 400 * (0.6 - (-0.2)) = 320 between best and worst
    assert fit.ratings["terse"] - fit.ratings["verbose"] == pytest.approx(320, abs=40)


def test_the_fit_is_the_penalised_likelihood_optimum() -> None:
    """An independent optimiser (L-BFGS on the written-out loss) lands on the same parameters."""
    df, _ = _synthetic(800, seed=2, length_coef=0.8)
    d = style_design(df)
    m, f, alpha, l2 = len(d.models), d.x.shape[1], math.log(10), 0.5

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = alpha * (theta[d.a] - theta[d.b]) + d.x @ theta[m:]
        p = 1 / (1 + np.exp(-z))
        value = float(np.sum(np.logaddexp(0, z) - d.y * z) + 0.5 * l2 * theta @ theta)
        r = p - d.y
        grad = l2 * theta
        np.add.at(grad, d.a, alpha * r)
        np.add.at(grad, d.b, -alpha * r)
        grad[m:] += d.x.T @ r
        return value, grad

    ref = minimize(loss, np.zeros(m + f), jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
    fit = compute_style_bt(df)
    ours = np.r_[(fit.ratings[d.models].to_numpy() - 1000) / 400, list(fit.coefficients.values())]
    assert np.abs(loss(ours)[1]).max() < 1e-6  # a stationary point of the penalised loss
    assert loss(ours)[0] <= ref.fun + 1e-9
    assert np.abs(ours - ref.x).max() < 1e-4


def test_bootstrap_intervals_cover_and_are_reproducible() -> None:
    df, _ = _synthetic(1500, seed=3, length_coef=1.0)
    boot, coefs = compute_bootstrap_style_bt(df, num_round=60, seed=7, anchor=("plain", 1000))
    again, _ = compute_bootstrap_style_bt(df, num_round=60, seed=7, anchor=("plain", 1000))
    pd.testing.assert_frame_equal(boot, again)
    point = compute_style_bt(df, anchor=("plain", 1000)).ratings
    assert (boot["plain"] == 1000).all()
    lo, hi = boot.quantile(0.025), boot.quantile(0.975)
    assert ((lo <= point[boot.columns]) & (point[boot.columns] <= hi)).all()
    assert coefs["length"].quantile(0.025) < 1.0 < coefs["length"].quantile(0.975)


def test_leaderboard_rates_with_style_control_from_the_answer_files(make_cfg) -> None:
    """MT-bench battles get conv_metadata from the answers; the board leads with the
    style-controlled rating, keeps the raw one, and reports the coefficients."""
    cfg = make_cfg("rating.bootstrap_rounds=40", "rating.anchor.model=base")
    rng = np.random.default_rng(0)
    long_text = "\n".join(f"- point {i} with **detail**" for i in range(40))
    answers = {"finetuned": long_text, "base": "A short answer.", "other": "Medium length " * 8}
    qids = list(range(1, 41))
    for model, text in answers.items():
        rows = [
            {
                "question_id": q,
                "model_id": model,
                "choices": [{"index": 0, "turns": [text, text]}],
                # the base's file predates style counts: they are counted from its text
                **({"style": [answer_style(text)] * 2} if model != "base" else {}),
            }
            for q in qids
        ]
        io.write_jsonl(answer_uri(cfg, model), rows)
    pairs = []
    for q in qids:
        for m1, m2 in (("finetuned", "base"), ("other", "base"), ("finetuned", "other")):
            g = "model_1" if rng.random() < 0.7 else "model_2"  # the judge loves the longer one
            pairs.append(
                {
                    "question_id": q,
                    "model_1": m1,
                    "model_2": m2,
                    "g1_winner": g,
                    "g2_winner": g,
                    "judge": ["j", "pair-v2"],
                    "turn": 1,
                }
            )
    io.write_jsonl(judgment_uris(cfg)[1], pairs)
    battles = build_battles(cfg, {"pair_uri": judgment_uris(cfg)[1], "judge_model": "j"})
    rows = list(io.read_jsonl(battles["uri"]))
    assert all("conv_metadata" in r for r in rows)
    board = build_leaderboard(cfg, battles, None)
    assert board["style"]["on"] and "length" in board["style"]["coefficients"]
    length = board["style"]["coefficients"]["length"]
    assert length["sandwich_lower"] < length["value"] < length["sandwich_upper"]
    robust = board["style"]["sandwich"]
    assert robust["base"]["ci_lower"] == pytest.approx(1000)  # the anchor has no spread
    assert robust["finetuned"]["ci_upper"] > robust["finetuned"]["ci_lower"]
    assert board["scale"].endswith(";style=controlled")
    for row in board["rows"]:
        assert {"raw_rating", "raw_ci_lower", "raw_ci_upper", "raw_rank"} <= set(row)
    by_model = {r["model"]: r for r in board["rows"]}
    assert by_model["base"]["rating"] == pytest.approx(1000)
    assert board["lc_win_rate"]["baseline"] == "base"
    assert (
        by_model["finetuned"]["lc_win_rate"] is not None and by_model["base"]["lc_win_rate"] is None
    )
    assert set(board["judge_bias"]["length_preference"]) >= {
        "value",
        "ci_lower",
        "ci_upper",
        "sandwich_lower",
    }
    assert board["judge_bias"]["position_preference"]["games"] == 2 * len(pairs)
    assert by_model["finetuned"]["rating"] != by_model["finetuned"]["raw_rating"]

    # a battle without style counts (an external file) turns style control off, saying why
    cfg2 = make_cfg("rating.bootstrap_rounds=20", "rating.anchor.model=base")
    ext = io.artifact_uri(cfg2, "ext.jsonl")
    io.write_jsonl(ext, [{"model_a": "finetuned", "model_b": "base", "winner": "model_b"}])
    cfg2.rating.external_battles = [ext]
    b2 = build_battles(cfg2, {"pair_uri": judgment_uris(cfg)[1], "judge_model": "j"})
    board2 = build_leaderboard(cfg2, b2, None)
    assert not board2["style"]["on"] and "1 of" in board2["style"]["note"]
    assert "raw_rating" not in board2["rows"][0]


def test_position_preference_flags_a_judge_that_favours_the_first_answer() -> None:
    fair = pd.DataFrame(
        {"g1_winner": ["model_1", "model_2"] * 50, "g2_winner": ["model_2", "model_1"] * 50}
    )
    assert position_preference(fair)["first_share"] == pytest.approx(0.5)
    assert position_preference(fair)["biased"] is False
    first = pd.DataFrame({"g1_winner": ["model_1"] * 60, "g2_winner": ["model_2"] * 60})
    out = position_preference(first)
    assert out["first_share"] == 1.0 and out["biased"] is True and out["games"] == 120


def test_sandwich_intervals_match_the_bootstrap() -> None:
    df, _ = _synthetic(3000, seed=4, length_coef=1.0)
    models, features = sandwich_style_intervals(df, anchor=("plain", 1000))
    point = compute_style_bt(df, anchor=("plain", 1000))
    assert models.loc["plain", "rating"] == pytest.approx(1000)
    assert models.loc["plain", "upper"] - models.loc["plain", "lower"] == pytest.approx(0)
    for m in point.ratings.index:
        assert models.loc[m, "rating"] == pytest.approx(point.ratings[m], abs=1e-6)
    boot, coefs = compute_bootstrap_style_bt(df, num_round=300, seed=1, anchor=("plain", 1000))
    for m in ("terse", "mid", "verbose"):
        width = boot[m].quantile(0.975) - boot[m].quantile(0.025)
        assert models.loc[m, "upper"] - models.loc[m, "lower"] == pytest.approx(width, rel=0.2)
    width = coefs["length"].quantile(0.975) - coefs["length"].quantile(0.025)
    got = features.loc["length", "upper"] - features.loc["length", "lower"]
    assert got == pytest.approx(width, rel=0.2)
    assert features.loc["length", "lower"] < 1.0 < features.loc["length", "upper"]
