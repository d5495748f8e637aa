"""Online Elo, Bradley–Terry maximum likelihood and its bootstrap, on FastChat's battle columns.

The Bradley–Terry fit never looks at battle rows: it works on sufficient statistics, the number
of wins of each model over each other model (a tie is half a win for each side), so a fit over a
million battles costs the same as one over a thousand. The bootstrap resamples those counts with
one multinomial draw per round over the observed (pair, outcome) cells, which is exactly the
distribution of counts that resampling battle rows with replacement gives, and solves all rounds
at once with batched Newton steps on a (rounds x models) array (`bradley_terry`; the counts
and the matrices the leaderboard shows are in `counts`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from arenaflow.rating.bradley_terry import (
    DEFAULT_L2,
    PairModel,
    anchor_tuple,
    chord,
    chord_inverse,
    newton,
    solve_bt,
    to_ratings,
)
from arenaflow.rating.counts import check_columns, outcome_cells, pair_counts


def compute_bt(
    battles: pd.DataFrame,
    scale: float = 400,
    base: float = 10,
    init_rating: float = 1000,
    anchor: tuple[str, float] | None = None,
    *,
    l2: float = DEFAULT_L2,
    soft: bool = False,
) -> pd.Series:
    """Bradley–Terry ratings, a tie counting as half a win for each side (FastChat's
    `compute_elo_mle_with_tie`). `l2` is the Gaussian prior FastChat's LogisticRegression(C=1)
    puts on the strengths (0.5 per battle here; 0 = pure MLE); without an anchor the ratings
    average `init_rating`, with `anchor=(model, rating)` that model sits at that rating.
    `soft`: a battle with `score_a` counts as that fraction of a win for model_a (the rest for
    model_b) instead of by its winner.
    """
    pc = pair_counts(battles)
    cells = outcome_cells(battles, pc, soft)
    wi, wj = cells.wins(cells.counts[None])
    beta = solve_bt(pc, wi, wj, base=base, l2=l2)
    ratings = to_ratings(beta, pc.models, scale, init_rating, anchor_tuple(anchor))[0]
    return pd.Series(ratings, index=pc.models, name="rating").sort_values(ascending=False)


def compute_bootstrap_bt(
    battles: pd.DataFrame,
    num_round: int = 1000,
    seed: int = 0,
    *,
    scale: float = 400,
    base: float = 10,
    init_rating: float = 1000,
    anchor: tuple[str, float] | None = None,
    l2: float = DEFAULT_L2,
    soft: bool = False,
    chunk_rounds: int = 250,
) -> pd.DataFrame:
    """Bootstrap Bradley–Terry ratings: one row per round, one column per model (by median, best first).

    Each round draws the counts of every outcome cell (`outcome_cells`: per pair and outcome, or
    per pair and expected score when `soft`) from a multinomial over the observed cells with the
    battle total as its size: the same law as resampling rows with replacement.
    """
    pc = pair_counts(battles)
    anchor_t = anchor_tuple(anchor)
    cells = outcome_cells(battles, pc, soft)
    total = int(cells.counts.sum())
    if total == 0:
        raise ValueError("no battles to bootstrap")
    pm = PairModel(pc.i, pc.j, len(pc.models), base, l2)
    obs_i, obs_j = (w[0] for w in cells.wins(cells.counts[None]))
    point = newton(pm, obs_i[None], obs_j[None], np.zeros((1, len(pc.models))), 1e-7, 100)[0]
    h_inv = chord_inverse(pm, point, obs_i, obs_j)
    sizes = [min(chunk_rounds, num_round - s) for s in range(0, num_round, chunk_rounds)]
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(sizes))]

    def draw(c: int) -> np.ndarray:
        return streams[c].multinomial(total, cells.counts / total, size=sizes[c])

    out = np.empty((num_round, len(pc.models)))
    from tqdm.auto import tqdm

    # Multinomial draws release the GIL: the next chunk is drawn while this one is solved.
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        tqdm(total=num_round, desc="bootstrap BT", unit="round", disable=num_round < 200) as bar,
    ):
        start = 0
        for c, draws in enumerate(pool.map(draw, range(len(sizes)))):
            wi, wj = cells.wins(draws.astype(np.float64))
            beta = chord(pm, wi, wj, point, h_inv, 1e-7, 100)
            out[start : start + sizes[c]] = to_ratings(
                beta, pc.models, scale, init_rating, anchor_t
            )
            start += sizes[c]
            bar.update(sizes[c])
    df = pd.DataFrame(out, columns=pc.models)
    return df[df.median().sort_values(ascending=False).index]


def bootstrap_intervals(boot: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per model: median and the central `level` interval of the bootstrap ratings."""
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return pd.DataFrame(
        {
            "lower": boot.quantile(lo),
            "median": boot.quantile(0.5),
            "upper": boot.quantile(hi),
        }
    )


TIE_EPS = 1e-6  # rating points: a bootstrap difference this small is no difference


def paired_differences(
    boot: pd.DataFrame, point: pd.Series, level: float = 0.95
) -> dict[str, dict[str, dict[str, float]]]:
    """For every ordered pair (a, b): rating(a) - rating(b) at the point estimate, the central
    `level` interval of that difference over the same bootstrap rounds, and P(a > b) in them.

    Both ratings come from one round's fit, so the interval is paired: the noise the two share
    (the anchor, the battles they both fought) cancels instead of adding up as two CIs would.
    """
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    models = list(boot.columns)
    values = boot.to_numpy()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for i, a in enumerate(models):
        out[a] = {}
        for j, b in enumerate(models):
            if i == j:
                continue
            d = values[:, i] - values[:, j]
            out[a][b] = {
                "diff": float(point[a] - point[b]),
                "lower": float(np.quantile(d, lo)),
                "upper": float(np.quantile(d, hi)),
                # a round with no difference (e.g. only tied battles) counts half
                "p_better": float((d > TIE_EPS).mean() + 0.5 * (np.abs(d) <= TIE_EPS).mean()),
            }
    return out


def compute_elo(
    battles: pd.DataFrame,
    k: float = 4,
    scale: float = 400,
    base: float = 10,
    init_rating: float = 1000,
) -> dict[str, float]:
    """Online Elo in battle order (FastChat's `compute_elo`): sensitive to order, kept for comparison."""
    check_columns(battles)
    rating: dict[str, float] = {}
    a_col = battles["model_a"].to_numpy()
    b_col = battles["model_b"].to_numpy()
    winners = battles["winner"].to_numpy()
    score = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
    for a, b, winner in zip(a_col, b_col, winners, strict=True):
        ra = rating.setdefault(a, float(init_rating))
        rb = rating.setdefault(b, float(init_rating))
        ea = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        sa = score[winner]
        rating[a] = ra + k * (sa - ea)
        rating[b] = rb + k * ((1.0 - sa) - (1.0 - ea))
    return rating


def predicted_win_rate(
    ratings: pd.Series | dict[str, float], scale: float = 400, base: float = 10
) -> pd.DataFrame:
    """P(row beats column) under the Elo/BT model for the given ratings (NaN on the diagonal)."""
    r = pd.Series(ratings, dtype=float)
    diff = r.to_numpy()[None, :] - r.to_numpy()[:, None]
    p = 1.0 / (1.0 + np.power(base, diff / scale))
    np.fill_diagonal(p, np.nan)
    return pd.DataFrame(p, index=r.index, columns=r.index)


def ci_rank(lower: pd.Series, upper: pd.Series) -> pd.Series:
    """1 + the number of models whose lower bound is above this model's upper bound."""
    lo = lower.to_numpy()[None, :]
    up = upper.reindex(lower.index).to_numpy()[:, None]
    return pd.Series(1 + (lo > up).sum(axis=1), index=lower.index, name="rank")
