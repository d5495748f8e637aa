"""The Bradley–Terry likelihood on pair counts and its batched solvers.

Strengths are fitted on sufficient statistics (`counts.PairCounts`), batched over bootstrap
rounds as a (rounds x models) array: damped Newton from zero for a point fit, chord iterations
that reuse the point fit's Hessian for bootstrap rounds. `to_ratings` turns strengths into rating
points, shifted so an anchor model sits at its rating.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import sparse

from arenaflow.rating.counts import PairCounts

log = logging.getLogger(__name__)

DEFAULT_L2 = 0.5  # FastChat's LogisticRegression(C=1.0) prior, per battle (see `compute_bt`)


class PairModel:
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


def newton(
    pm: PairModel, wi: np.ndarray, wj: np.ndarray, beta: np.ndarray, tol: float, max_iter: int
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


def chord_inverse(pm: PairModel, start: np.ndarray, wi: np.ndarray, wj: np.ndarray) -> np.ndarray:
    """Inverse Hessian at `start` for the observed counts `wi`/`wj` (K,)."""
    _, p0 = pm.grad(start[None, :], wi[None], wj[None])
    return np.linalg.inv(pm.hessian(p0, wi[None], wj[None])[0])


def chord(
    pm: PairModel,
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
        beta[rest] = newton(
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
    pm = PairModel(pc.i, pc.j, m, base, l2)
    if start is None:
        return newton(pm, wi, wj, np.zeros((wi.shape[0], m)), tol, max_iter)
    h_inv = chord_inverse(pm, start, wi.mean(axis=0), wj.mean(axis=0))
    return chord(pm, wi, wj, start, h_inv, tol, max_iter)


def to_ratings(
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


def anchor_tuple(anchor: object) -> tuple[str, float] | None:
    if anchor is None:
        return None
    if isinstance(anchor, tuple | list) and len(anchor) == 2:
        return str(anchor[0]), float(anchor[1])
    if hasattr(anchor, "get") and anchor.get("model") is not None:
        return str(anchor.get("model")), float(anchor.get("rating"))
    raise ValueError(f"anchor must be (model, rating) or {{model, rating}}, got {anchor!r}")
