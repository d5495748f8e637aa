"""Style control: Bradley–Terry with answer-style covariates, as Chatbot Arena rates models today.

Judges and voters both reward longer, more formatted answers. The contextual BT fit (FastChat's
`compute_style_control`) explains each battle's outcome by the strength difference of the two
models plus a linear term in their style differences, so a model's style-controlled rating is what
it earns when both answers look alike. Features (FastChat's `conv_metadata` layout, one set per
side): answer tokens, markdown headers, list items and bold spans, counted outside code blocks; a
battle's covariates are the normalised differences (a - b) / (a + b + 1), standardised over the
battles, in FastChat's order (length, headers, lists, bold).

`answer_style(text)` counts one answer's features (the answers file keeps them per turn);
`conv_metadata(a, b)` joins two sides; `compute_style_bt` / `compute_bootstrap_style_bt` fit.
The fit is damped Newton with the Hessian assembled from its blocks (the model block from pair
sums, the model-feature and feature blocks from sparse products over battles), batched over
bootstrap rounds that resample battles as multinomial row weights, warm-started from the point
fit: no battle is duplicated and no round runs an optimiser from zero.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from arenaflow.answer_style import META_A, META_B, tally
from arenaflow.rating.bradley_terry import DEFAULT_L2, anchor_tuple, to_ratings
from arenaflow.rating.counts import HARD_SCORE

FEATURES = ("length", "headers", "lists", "bold")  # FastChat's STYLE_CONTROL_ELEMENTS_V1 order


@dataclass(frozen=True)
class StyleDesign:
    """Battles as a contextual BT design: model ids, standardised covariates, outcomes."""

    models: list[str]
    a: np.ndarray  # (N,) index of model_a
    b: np.ndarray
    x: np.ndarray  # (N, F) covariates of the features kept
    y: np.ndarray  # (N,) model_a's score: 1, 0, 0.5 (or its expected score when soft)
    features: list[str]  # the features kept (a feature that never varies has no coefficient)


def style_design(battles: pd.DataFrame, soft: bool = False) -> StyleDesign:
    """The design of battles that all carry conv_metadata (see `has_style`)."""
    codes, uniques = pd.factorize(
        pd.concat([battles["model_a"], battles["model_b"]], ignore_index=True), sort=True
    )
    n = len(battles)
    meta = battles["conv_metadata"].tolist()
    sides = np.array(
        [[[tally(m[k]) for k in META_A], [tally(m[k]) for k in META_B]] for m in meta],
        dtype=np.float64,
    ).reshape(n, 2, len(META_A))
    diff = (sides[:, 0] - sides[:, 1]) / (sides[:, 0] + sides[:, 1] + 1.0)
    std = diff.std(axis=0)
    keep = std > 1e-12
    x = (diff[:, keep] - diff[:, keep].mean(axis=0)) / std[keep]
    y = battles["winner"].map(HARD_SCORE).fillna(0.5).to_numpy(dtype=np.float64)
    if soft and "score_a" in battles.columns:
        score = pd.to_numeric(battles["score_a"], errors="coerce").to_numpy(dtype=float)
        y = np.clip(np.where(np.isnan(score), y, score), 0.0, 1.0)
    return StyleDesign(
        models=[str(u) for u in uniques],
        a=codes[:n].astype(np.int64),
        b=codes[n:].astype(np.int64),
        x=np.ascontiguousarray(x),
        y=y,
        features=[f for f, k in zip(FEATURES, keep, strict=True) if k],
    )


class _StyleModel:
    """Penalised log-loss of the contextual BT model over rounds of battle weights (R, N)."""

    def __init__(self, d: StyleDesign, base: float, l2: float) -> None:
        self.d, self.m, self.f = d, len(d.models), d.x.shape[1]
        self.alpha = math.log(base)
        self.l2 = l2
        n = d.a.size
        rows = np.arange(n)
        # S (M, N): +1 at model_a, -1 at model_b of each battle
        self.s = sparse.csr_matrix(
            (np.r_[np.ones(n), -np.ones(n)], (np.r_[d.a, d.b], np.r_[rows, rows])),
            shape=(self.m, n),
        )
        self.st = (self.alpha * self.s.T).tocsr()  # (N, M): a battle's strength difference
        m = self.m
        # P (N, M*M): where a battle's curvature lands in the model block
        self.p = sparse.csr_matrix(
            (
                np.r_[np.ones(n), np.ones(n), -np.ones(n), -np.ones(n)],
                (
                    np.r_[rows, rows, rows, rows],
                    np.r_[d.a * m + d.a, d.b * m + d.b, d.a * m + d.b, d.b * m + d.a],
                ),
            ),
            shape=(n, m * m),
        )

    def logits(self, theta: np.ndarray) -> np.ndarray:
        beta, gamma = theta[:, : self.m], theta[:, self.m :]
        return (self.st @ beta.T).T + gamma @ self.d.x.T

    def loss(self, theta: np.ndarray, w: np.ndarray) -> np.ndarray:
        z = self.logits(theta)  # y log(1+e^-z) + (1-y) log(1+e^z) = log(1+e^z) - y z
        data = (w * (np.logaddexp(0.0, z) - self.d.y * z)).sum(axis=1)
        return data + 0.5 * self.l2 * (theta**2).sum(axis=1)

    def gradient(self, theta: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(R, M + F) gradient and the (R, N) win probabilities of model_a."""
        p = 1.0 / (1.0 + np.exp(-self.logits(theta)))
        r = w * (p - self.d.y)  # (R, N)
        g = np.concatenate([(self.st.T @ r.T).T, r @ self.d.x], axis=1)
        return g + self.l2 * theta, p

    def hessian(self, p: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(R, M + F, M + F) Hessian from its blocks."""
        m, f = self.m, self.f
        h = w * p * (1.0 - p)
        rounds = p.shape[0]
        hess = np.zeros((rounds, m + f, m + f))
        hess[:, :m, :m] = (self.alpha**2 * (self.p.T @ h.T).T).reshape(rounds, m, m)
        for k in range(f):
            cross = self.alpha * (self.s @ (h * self.d.x[:, k]).T).T  # (R, M)
            hess[:, :m, m + k] = cross
            hess[:, m + k, :m] = cross
        hess[:, m:, m:] = (h[:, :, None] * self.d.x).transpose(0, 2, 1) @ self.d.x
        hess += (self.l2 + 1e-9) * np.eye(m + f)
        if self.l2 <= 0:
            hess[:, :m, :m] += 1.0 / m  # the strengths' free shift
        return hess

    def newton_step(self, theta: np.ndarray, w: np.ndarray) -> np.ndarray:
        g, p = self.gradient(theta, w)
        return -np.linalg.solve(self.hessian(p, w), g[:, :, None])[:, :, 0]


def _fit(
    sm: _StyleModel, w: np.ndarray, start: np.ndarray, tol: float = 1e-7, max_iter: int = 50
) -> np.ndarray:
    """Damped Newton per round (step halving until the loss does not rise)."""
    theta = start.copy()
    loss = sm.loss(theta, w)
    active = np.arange(theta.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        step = sm.newton_step(theta[active], w[active])
        t = np.ones(active.size)
        new = sm.loss(theta[active] + step, w[active])
        for _halving in range(30):
            worse = new > loss[active] + 1e-12 * np.abs(loss[active])
            if not worse.any():
                break
            t[worse] *= 0.5
            idx = active[worse]
            new[worse] = sm.loss(theta[idx] + t[worse, None] * step[worse], w[idx])
        theta[active] += t[:, None] * step
        loss[active] = new
        active = active[np.abs(t[:, None] * step).max(axis=1) >= tol]
    return theta


def _chord(
    sm: _StyleModel, w: np.ndarray, point: np.ndarray, tol: float = 1e-7, max_iter: int = 30
) -> np.ndarray:
    """Bootstrap rounds solved with the point fit's Hessian held fixed (chord iterations: a
    resampled battle set's Hessian is close to the full set's, so a few gradient passes converge
    and no Hessian is assembled per round); rounds that do not contract fall back to Newton."""
    _, p0 = sm.gradient(point, np.ones((1, w.shape[1])))
    h_inv = np.linalg.inv(sm.hessian(p0, np.ones((1, w.shape[1])))[0])
    theta = np.repeat(point, w.shape[0], axis=0)
    last = np.full(w.shape[0], np.inf)
    active = np.arange(w.shape[0])
    stuck = np.zeros(w.shape[0], dtype=bool)
    for _ in range(max_iter):
        if active.size == 0:
            break
        g, _p = sm.gradient(theta[active], w[active])
        step = -(g @ h_inv)
        size = np.abs(step).max(axis=1)
        ok = np.isfinite(size) & (size < last[active])
        theta[active[ok]] += step[ok]
        stuck[active[~ok]] = True
        last[active] = size
        active = active[ok & (size >= tol)]
    stuck[active] = True
    if stuck.any():
        idx = np.flatnonzero(stuck)
        theta[idx] = _fit(sm, w[idx], np.repeat(point, idx.size, axis=0))
    return theta


@dataclass
class StyleFit:
    """Style-controlled ratings (`ratings`, best first) and the style coefficients: per feature,
    the logit change of one standard deviation of style difference in model_a's favour."""

    ratings: pd.Series
    coefficients: dict[str, float]
    battles: int


def compute_style_bt(
    battles: pd.DataFrame,
    scale: float = 400,
    base: float = 10,
    init_rating: float = 1000,
    anchor: tuple[str, float] | None = None,
    *,
    l2: float = DEFAULT_L2,
    soft: bool = False,
) -> StyleFit:
    """Contextual Bradley–Terry on battles with `conv_metadata` (FastChat's `compute_style_control`:
    same features, normalisation, prior and scale)."""
    d = style_design(battles, soft)
    sm = _StyleModel(d, base, l2)
    theta = _fit(sm, np.ones((1, d.y.size)), np.zeros((1, sm.m + sm.f)))
    ratings = to_ratings(theta[:, : sm.m], d.models, scale, init_rating, anchor_tuple(anchor))[0]
    return StyleFit(
        pd.Series(ratings, index=d.models, name="rating").sort_values(ascending=False),
        dict(zip(d.features, map(float, theta[0, sm.m :]), strict=True)),
        int(d.y.size),
    )


def compute_bootstrap_style_bt(
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bootstrap style-controlled ratings (rounds x models, by median best first) and coefficients
    (rounds x features). A round resamples the battles with replacement (multinomial row counts),
    as FastChat's `compute_bootstrap_style_control` does; covariates keep the full set's scaling."""
    d = style_design(battles, soft)
    sm = _StyleModel(d, base, l2)
    n = d.y.size
    point = _fit(sm, np.ones((1, n)), np.zeros((1, sm.m + sm.f)))
    # at least two chunks, so both threads work (numpy releases the GIL in the large operations)
    chunk = max(1, min(-(-num_round // 2), 2_000_000 // max(n, 1)))  # ~16 MB of weights
    starts = list(range(0, num_round, chunk))
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(starts))]
    thetas = np.empty((num_round, sm.m + sm.f))

    def solve(c: int) -> None:
        start, size = starts[c], min(chunk, num_round - starts[c])
        # row counts of n draws with replacement, per round (a multinomial over the battles)
        picks = streams[c].integers(0, n, (size, n)) + (np.arange(size) * n)[:, None]
        w = np.bincount(picks.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        thetas[start : start + size] = _chord(sm, w, point)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(solve, range(len(starts))))
    ratings = to_ratings(thetas[:, : sm.m], d.models, scale, init_rating, anchor_tuple(anchor))
    boot = pd.DataFrame(ratings, columns=d.models)
    coefs = pd.DataFrame(thetas[:, sm.m :], columns=d.features)
    return boot[boot.median().sort_values(ascending=False).index], coefs
