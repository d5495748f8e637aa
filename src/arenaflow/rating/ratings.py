"""Online Elo, Bradley–Terry maximum likelihood and its bootstrap, on FastChat's battle columns.

The Bradley–Terry fit never looks at battle rows: it works on sufficient statistics, the number
of wins of each model over each other model (a tie is half a win for each side), so a fit over a
million battles costs the same as one over a thousand. The bootstrap resamples those counts with
one multinomial draw per round over the observed (pair, outcome) cells, which is exactly the
distribution of counts that resampling battle rows with replacement gives, and solves all rounds
at once with batched Newton steps on a (rounds x models) array.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

log = logging.getLogger(__name__)

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
TIES = ("tie", "tie (bothbad)")
DEFAULT_L2 = 0.5  # FastChat's LogisticRegression(C=1.0) prior, per battle (see `compute_bt`)


@dataclass(frozen=True)
class PairCounts:
    """Sufficient statistics of a battle set: per unordered pair (i < j), wins of i, wins of j, ties."""

    models: list[str]
    i: np.ndarray
    j: np.ndarray
    wins_i: np.ndarray
    wins_j: np.ndarray
    ties: np.ndarray

    @property
    def total(self) -> int:
        return int(self.wins_i.sum() + self.wins_j.sum() + self.ties.sum())


def _check_columns(battles: pd.DataFrame) -> None:
    missing = [c for c in ("model_a", "model_b", "winner") if c not in battles.columns]
    if missing:
        raise ValueError(
            f"battles lack column(s) {missing}; expected FastChat's model_a, model_b, winner"
        )
    bad = ~battles["winner"].isin(WINNERS)
    if bad.any():
        examples = sorted(map(str, battles.loc[bad, "winner"].unique()))[:5]
        raise ValueError(
            f"{int(bad.sum())} battle(s) have a winner outside {list(WINNERS)}, e.g. {examples}; "
            "clean them first (arenaflow.rating.battles counts and drops such rows)"
        )


def pair_counts(battles: pd.DataFrame, models: Sequence[str] | None = None) -> PairCounts:
    """Collapse battle rows into win/tie counts per unordered model pair."""
    _check_columns(battles)
    codes, uniques = pd.factorize(
        pd.concat([battles["model_a"], battles["model_b"]], ignore_index=True), sort=True
    )
    names = [str(u) for u in uniques] if models is None else list(models)
    if models is not None:
        unknown = sorted(set(map(str, uniques)) - set(names))
        if unknown:
            raise ValueError(f"battles name models {unknown[:5]} that are not in `models`")
        codes = np.asarray([names.index(str(u)) for u in uniques], dtype=np.int64)[codes]
    a, b = codes[: len(battles)].astype(np.int64), codes[len(battles) :].astype(np.int64)
    winner = battles["winner"].to_numpy()
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    swapped = a > b
    outcome = np.full(len(battles), 2, dtype=np.int64)  # 0: lo wins, 1: hi wins, 2: tie
    a_won = winner == "model_a"
    b_won = winner == "model_b"
    outcome[(a_won & ~swapped) | (b_won & swapped)] = 0
    outcome[(a_won & swapped) | (b_won & ~swapped)] = 1
    m = len(names)
    counts = np.bincount((lo * m + hi) * 3 + outcome, minlength=m * m * 3).reshape(m * m, 3)
    cells = np.flatnonzero(counts.sum(axis=1))
    return PairCounts(
        models=names,
        i=cells // m,
        j=cells % m,
        wins_i=counts[cells, 0].astype(np.float64),
        wins_j=counts[cells, 1].astype(np.float64),
        ties=counts[cells, 2].astype(np.float64),
    )


class _PairModel:
    """Bradley–Terry negative log-likelihood, gradient and Hessian over K observed pairs, batched
    over rounds: `wi`/`wj` (rounds, K) are the wins of each pair's first/second model, ties halved."""

    def __init__(self, i: np.ndarray, j: np.ndarray, m: int, base: float, l2: float) -> None:
        self.i, self.j, self.m, self.l2 = i, j, m, l2
        self.log_base = math.log(base)
        k = np.arange(i.size)
        self.scatter = sparse.csr_matrix(
            (np.r_[np.ones(i.size), -np.ones(i.size)], (np.r_[i, j], np.r_[k, k])),
            shape=(m, i.size),
        )

    def diff(self, beta: np.ndarray) -> np.ndarray:
        return self.log_base * (beta[:, self.i] - beta[:, self.j])

    def loss(self, beta: np.ndarray, wi: np.ndarray, wj: np.ndarray) -> np.ndarray:
        d = self.diff(beta)
        data = (wi * np.logaddexp(0.0, -d) + wj * np.logaddexp(0.0, d)).sum(axis=1)
        return data + 0.5 * self.l2 * (beta**2).sum(axis=1)

    def grad(
        self, beta: np.ndarray, wi: np.ndarray, wj: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gradient (rounds, M) and the win probabilities of each pair's first model."""
        p = 1.0 / (1.0 + np.exp(-self.diff(beta)))
        resid = wi - (wi + wj) * p
        return -self.log_base * (self.scatter @ resid.T).T + self.l2 * beta, p

    def hessian(self, p: np.ndarray, wi: np.ndarray, wj: np.ndarray) -> np.ndarray:
        """(rounds, M, M) Hessian, made invertible along the free shift when l2 = 0."""
        m = self.m
        h = self.log_base**2 * (wi + wj) * p * (1.0 - p)
        out = np.zeros((h.shape[0], m * m))
        out[:, self.i * m + self.j] = -h
        out[:, self.j * m + self.i] = -h
        out = out.reshape(-1, m, m)
        out[:, np.arange(m), np.arange(m)] = -out.sum(axis=2)
        out += (self.l2 + 1e-9) * np.eye(m)
        if self.l2 <= 0:
            out += 1.0 / m
        return out


def _newton(
    pm: _PairModel, wi: np.ndarray, wj: np.ndarray, beta: np.ndarray, tol: float, max_iter: int
) -> np.ndarray:
    """Damped Newton (step halving until the loss does not rise), each round on its own."""
    beta = beta.copy()
    loss = pm.loss(beta, wi, wj)
    active = np.arange(beta.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        b, wa, wb = beta[active], wi[active], wj[active]
        g, p = pm.grad(b, wa, wb)
        step = -np.linalg.solve(pm.hessian(p, wa, wb), g[:, :, None])[:, :, 0]
        t = np.ones(active.size)
        new = pm.loss(b + step, wa, wb)
        for _halving in range(40):
            worse = new > loss[active] + 1e-12 * np.abs(loss[active])
            if not worse.any():
                break
            t[worse] *= 0.5
            new[worse] = pm.loss(b[worse] + t[worse, None] * step[worse], wa[worse], wb[worse])
        beta[active] = b + t[:, None] * step
        loss[active] = new
        active = active[np.abs(t[:, None] * step).max(axis=1) >= tol]
    if active.size:
        log.warning(
            "Bradley–Terry: %d round(s) not converged after %d Newton steps (a model that wins "
            "or loses every battle has no finite MLE; use l2 > 0)",
            active.size,
            max_iter,
        )
    return beta


def _chord_inverse(pm: _PairModel, start: np.ndarray, wi: np.ndarray, wj: np.ndarray) -> np.ndarray:
    """Inverse Hessian at `start` for the observed counts `wi`/`wj` (K,)."""
    _, p0 = pm.grad(start[None, :], wi[None], wj[None])
    return np.linalg.inv(pm.hessian(p0, wi[None], wj[None])[0])


def _chord(
    pm: _PairModel,
    wi: np.ndarray,
    wj: np.ndarray,
    start: np.ndarray,
    h_inv: np.ndarray,
    tol: float,
    max_iter: int,
) -> np.ndarray:
    rounds = wi.shape[0]
    beta = np.repeat(start[None, :], rounds, axis=0)
    converged = np.zeros(rounds, dtype=bool)
    last = np.full(rounds, np.inf)
    active = np.arange(rounds)
    for _ in range(30):
        g, _p = pm.grad(beta[active], wi[active], wj[active])
        step = -(g @ h_inv)
        size = np.abs(step).max(axis=1)
        shrinking = np.isfinite(size) & (size < last[active])
        beta[active[shrinking]] += step[shrinking]
        last[active] = size
        converged[active[shrinking & (size < tol)]] = True
        active = active[shrinking & (size >= tol)]
        if active.size == 0:
            break
    rest = np.flatnonzero(~converged)
    if rest.size:
        beta[rest] = _newton(
            pm, wi[rest], wj[rest], np.repeat(start[None, :], rest.size, axis=0), tol, max_iter
        )
    return beta


def solve_bt(
    pc: PairCounts,
    wi: np.ndarray,
    wj: np.ndarray,
    *,
    base: float = 10.0,
    l2: float = DEFAULT_L2,
    start: np.ndarray | None = None,
    tol: float = 1e-7,
    max_iter: int = 100,
) -> np.ndarray:
    """Bradley–Terry strengths (rounds, M), in units of `scale` rating points, summing to zero.

    Minimizes the negative log-likelihood plus `l2/2 * |beta|^2` (convex) for each row of the
    win counts `wi`/`wj` (rounds, K; ties halved). Given `start` (the point estimate, for
    bootstrap rounds) it first runs chord iterations that reuse the Hessian at `start` for every
    round: one M x M inverse and two sparse products per iteration instead of a Newton solve per
    round. Rounds the chord steps do not settle go on with damped Newton.
    """
    m = len(pc.models)
    pm = _PairModel(pc.i, pc.j, m, base, l2)
    if start is None:
        return _newton(pm, wi, wj, np.zeros((wi.shape[0], m)), tol, max_iter)
    h_inv = _chord_inverse(pm, start, wi.mean(axis=0), wj.mean(axis=0))
    return _chord(pm, wi, wj, start, h_inv, tol, max_iter)


def _to_ratings(
    beta: np.ndarray,
    models: list[str],
    scale: float,
    init_rating: float,
    anchor: tuple[str, float] | None,
) -> np.ndarray:
    ratings = scale * beta + init_rating
    if anchor is not None:
        name, value = anchor
        if name not in models:
            raise ValueError(
                f"anchor model {name!r} has no battles; anchor on one of {models} or set anchor=None"
            )
        k = models.index(name)
        ratings = ratings + (float(value) - ratings[:, k : k + 1])
    return ratings


def _anchor_tuple(anchor: object) -> tuple[str, float] | None:
    if anchor is None:
        return None
    if isinstance(anchor, tuple | list) and len(anchor) == 2:
        return str(anchor[0]), float(anchor[1])
    if hasattr(anchor, "get") and anchor.get("model") is not None:
        return str(anchor.get("model")), float(anchor.get("rating"))
    raise ValueError(f"anchor must be (model, rating) or {{model, rating}}, got {anchor!r}")


HARD_SCORE = {"model_a": 1.0, "model_b": 0.0}  # ties (and "tie (bothbad)") score 0.5


@dataclass
class OutcomeCells:
    """Battles grouped into cells that a bootstrap resamples: `counts` (C,) battles per cell, and
    what one battle of each cell adds to its pair's wins: `first` / `second` (C, K) sparse, the
    score of the pair's first / second model (1, 0 or 0.5 for hard outcomes; the expected score
    for soft ones). Resampling battles with replacement is a multinomial over the cells."""

    counts: np.ndarray
    first: sparse.csr_matrix
    second: sparse.csr_matrix

    def wins(self, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, K) wins of each pair's first and second model for (rounds, C) cell counts."""
        return np.asarray((self.first.T @ draws.T).T), np.asarray((self.second.T @ draws.T).T)


def outcome_cells(battles: pd.DataFrame, pc: PairCounts, soft: bool = False) -> OutcomeCells:
    """Hard cells: per pair, first wins / second wins / tie. Soft cells: per pair and expected
    score, from each battle's `score_a` (model_a's expected score, e.g. from the judge's verdict
    probabilities) where it is set, else from its winner."""
    k = pc.i.size
    if not soft or "score_a" not in battles.columns:
        eye = sparse.identity(k, format="csr")
        zero = sparse.csr_matrix((k, k))
        return OutcomeCells(
            np.concatenate([pc.wins_i, pc.wins_j, pc.ties]),
            sparse.vstack([eye, zero, 0.5 * eye], format="csr"),
            sparse.vstack([zero, eye, 0.5 * eye], format="csr"),
        )
    pos = {m: n for n, m in enumerate(pc.models)}
    a = battles["model_a"].map(pos).to_numpy()
    b = battles["model_b"].map(pos).to_numpy()
    score = pd.to_numeric(battles["score_a"], errors="coerce").to_numpy(dtype=float)
    hard = battles["winner"].map(HARD_SCORE).fillna(0.5).to_numpy(dtype=float)
    score = np.clip(np.where(np.isnan(score), hard, score), 0.0, 1.0)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    score_lo = np.where(a > b, 1.0 - score, score)
    pair_of = {(int(i), int(j)): n for n, (i, j) in enumerate(zip(pc.i, pc.j, strict=True))}
    pair = np.array([pair_of[(int(x), int(y))] for x, y in zip(lo, hi, strict=True)])
    keys, counts = np.unique(
        np.stack([pair, np.round(score_lo, 6)], axis=1), axis=0, return_counts=True
    )
    rows = np.arange(len(keys))
    cols = keys[:, 0].astype(np.int64)
    shape = (len(keys), k)
    return OutcomeCells(
        counts.astype(np.float64),
        sparse.csr_matrix((keys[:, 1], (rows, cols)), shape=shape),
        sparse.csr_matrix((1.0 - keys[:, 1], (rows, cols)), shape=shape),
    )


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
    ratings = _to_ratings(beta, pc.models, scale, init_rating, _anchor_tuple(anchor))[0]
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
    anchor_t = _anchor_tuple(anchor)
    cells = outcome_cells(battles, pc, soft)
    total = int(cells.counts.sum())
    if total == 0:
        raise ValueError("no battles to bootstrap")
    pm = _PairModel(pc.i, pc.j, len(pc.models), base, l2)
    obs_i, obs_j = (w[0] for w in cells.wins(cells.counts[None]))
    point = _newton(pm, obs_i[None], obs_j[None], np.zeros((1, len(pc.models))), 1e-7, 100)[0]
    h_inv = _chord_inverse(pm, point, obs_i, obs_j)
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
            beta = _chord(pm, wi, wj, point, h_inv, 1e-7, 100)
            out[start : start + sizes[c]] = _to_ratings(
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
    _check_columns(battles)
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


def battle_count_matrix(battles: pd.DataFrame, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Symmetric matrix of the number of battles between each pair of models."""
    pc = pair_counts(battles, models)
    m = len(pc.models)
    mat = np.zeros((m, m))
    n = pc.wins_i + pc.wins_j + pc.ties
    mat[pc.i, pc.j] = n
    mat[pc.j, pc.i] = n
    return pd.DataFrame(mat.astype(np.int64), index=pc.models, columns=pc.models)


def win_fraction_matrix(battles: pd.DataFrame, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Share of battles row model won outright against column model (ties count as not won; NaN: never met)."""
    pc = pair_counts(battles, models)
    m = len(pc.models)
    wins = np.zeros((m, m))
    wins[pc.i, pc.j] = pc.wins_i
    wins[pc.j, pc.i] = pc.wins_j
    n = battle_count_matrix(battles, pc.models).to_numpy().astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, wins / n, np.nan)
    return pd.DataFrame(frac, index=pc.models, columns=pc.models)


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
