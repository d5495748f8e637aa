"""Matplotlib figures rendered to PNG bytes, for Dagster metadata and MLflow artifacts."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

from arenaflow.io import fs_for

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_png(uri: str, fig: Figure) -> None:
    """A figure as a PNG file at any fsspec URI (its folder made first); the figure is closed."""
    fs, path = fs_for(uri)
    png = to_png(fig)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(png)


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 40) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(values, bins=bins, color="#4c72b0")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return fig


def line(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str, ylabel: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(xs, ys, marker=".")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig
