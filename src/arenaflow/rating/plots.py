"""Leaderboard figures: ratings with their bootstrap intervals, and model-by-model heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from arenaflow.plots import plt


def rating_ci_figure(rows: Sequence[dict[str, Any]], level: float) -> Figure:
    """Bradley–Terry rating per model with its bootstrap interval as an error bar, best first."""
    names = [r["model"] for r in rows]
    rating = [r["rating"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.4))
    x = np.arange(len(rows))
    ax.vlines(
        x, [r["ci_lower"] for r in rows], [r["ci_upper"] for r in rows], color="#4c72b0", lw=2
    )
    ax.plot(x, rating, "o", color="#c44e52", label="point estimate")
    ax.set_xticks(x, names)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"Bradley–Terry rating, {level:.0%} bootstrap interval")
    ax.set_ylabel("rating")
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(axis="x", rotation=30)
    return fig


def heatmap_figure(matrix: pd.DataFrame, title: str, fmt: str) -> Figure:
    """Row model vs column model, each cell annotated (blank where the two never met)."""
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.8 * n + 2), max(3.0, 0.7 * n + 1.5)))
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu" if "win" in title else "Blues")
    ax.set_xticks(range(n), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(n), matrix.index)
    for y in range(n):
        for x in range(n):
            if np.isfinite(values[y, x]):
                ax.text(x, y, format(values[y, x], fmt), ha="center", va="center", fontsize=8)
    ax.set_xlabel("model B")
    ax.set_ylabel("model A")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig
