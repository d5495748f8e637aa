"""Robust (sandwich) intervals of the style-controlled Bradley–Terry fit, without a bootstrap.

The covariance of the penalised maximum-likelihood estimate is H⁻¹ B H⁻¹: H the Hessian at the
fit (the same block assembly as the fit), B the sum over battles of the outer products of each
battle's score gradient (the same blocks with weights (p - y)² instead of p (1 - p)). It holds
when the model is misspecified (ties, soft scores, a judge that is not Bradley–Terry), which is
why lmarena's `arena-rank` reports it; one assembly instead of a thousand refits.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd

from arenaflow.rating.bradley_terry import DEFAULT_L2, anchor_tuple
from arenaflow.rating.style import _fit, _StyleModel, style_design


def sandwich_style_intervals(
    battles: pd.DataFrame,
    level: float = 0.95,
    *,
    scale: float = 400,
    base: float = 10,
    init_rating: float = 1000,
    anchor: tuple[str, float] | None = None,
    l2: float = DEFAULT_L2,
    soft: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per model: rating, lower, upper (rating points; relative to the anchor when there is one);
    per feature: coefficient, lower, upper. Normal intervals at `level`."""
    d = style_design(battles, soft)
    sm = _StyleModel(d, base, l2)
    ones = np.ones((1, d.y.size))
    theta = _fit(sm, ones, np.zeros((1, sm.m + sm.f)))
    _, p = sm.gradient(theta, ones)
    h_inv = np.linalg.inv(sm.hessian(p, ones)[0])
    meat = _meat(sm, (p[0] - d.y) ** 2)  # B: the Hessian's blocks, weighted by squared residuals
    cov = h_inv @ meat @ h_inv
    z = NormalDist().inv_cdf(0.5 + level / 2)
    m = sm.m
    beta = theta[0, :m]
    contrast = np.eye(m)
    anchor_t = anchor_tuple(anchor)
    ratings = scale * beta + init_rating
    if anchor_t is not None:
        k = d.models.index(anchor_t[0])
        contrast = contrast - np.eye(m)[k]  # rating(model) - rating(anchor)
        ratings = ratings + (anchor_t[1] - ratings[k])
    var = np.einsum("ij,jk,ik->i", contrast, cov[:m, :m], contrast)
    half = z * scale * np.sqrt(np.maximum(var, 0.0))
    models = pd.DataFrame(
        {"rating": ratings, "lower": ratings - half, "upper": ratings + half}, index=d.models
    )
    gamma = theta[0, m:]
    g_half = z * np.sqrt(np.maximum(np.diag(cov)[m:], 0.0))
    features = pd.DataFrame(
        {"coefficient": gamma, "lower": gamma - g_half, "upper": gamma + g_half},
        index=d.features,
    )
    return models.sort_values("rating", ascending=False), features


def _meat(sm: _StyleModel, weights: np.ndarray) -> np.ndarray:
    """Σ_n w_n x_n x_nᵀ over battles (x_n the battle's design row), in the Hessian's blocks."""
    m, f = sm.m, sm.f
    out = np.zeros((m + f, m + f))
    out[:m, :m] = (sm.alpha**2 * (sm.p.T @ weights)).reshape(m, m)
    for k in range(f):
        cross = sm.alpha * (sm.s @ (weights * sm.d.x[:, k]))
        out[:m, m + k] = cross
        out[m + k, :m] = cross
    out[m:, m:] = (weights[:, None] * sm.d.x).T @ sm.d.x
    return out
