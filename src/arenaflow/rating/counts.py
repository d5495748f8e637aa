"""Sufficient statistics of a battle set: win/tie counts per model pair, the outcome cells a
bootstrap resamples, and the count matrices the leaderboard shows.

Nothing here looks at battle rows twice: `pair_counts` collapses them once (a tie is half a win for
each side), which is what lets a Bradley–Terry fit over a million battles cost the same as one over
a thousand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
TIES = ("tie", "tie (bothbad)")
HARD_SCORE = {"model_a": 1.0, "model_b": 0.0}  # ties (and "tie (bothbad)") score 0.5


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


def check_columns(battles: pd.DataFrame) -> None:
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
    check_columns(battles)
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
