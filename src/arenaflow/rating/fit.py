"""One battle set rated: Bradley–Terry with bootstrap CI, online Elo, CI-aware rank, win counts
and, with `rating.style_control`, the style-controlled fit that then leads the board.

Every function takes the `rating` config section (`r`) and plain values; the leaderboard step
calls `fit_ratings` once per view (judge, human, combined).
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from arenaflow.answer_style import has_style
from arenaflow.rating.ratings import (
    bootstrap_intervals,
    ci_rank,
    compute_bootstrap_bt,
    compute_bt,
    compute_elo,
    paired_differences,
)
from arenaflow.rating.sandwich import sandwich_style_intervals
from arenaflow.rating.style import compute_bootstrap_style_bt, compute_style_bt

log = logging.getLogger(__name__)

CI_KEYS = ("rank", "rating", "ci_lower", "ci_upper")


def fit_anchor(anchor: Any, models: list[str]) -> tuple[tuple[str, float] | None, str]:
    """The anchor (`rating.anchor`) to fit with, and why when the configured one cannot be used."""
    if anchor is None or anchor.get("model") is None:
        return None, "unanchored (rating.anchor is null)"
    if anchor.model not in models:
        return None, (
            f"unanchored: rating.anchor.model {anchor.model!r} has no battles "
            f"(models: {models}); name a competitor or set rating.anchor=null"
        )
    rating = float(anchor.rating)
    return (str(anchor.model), rating), f"anchored: {anchor.model} = {rating:g}"


def rating_scale(
    anchor: tuple[str, float] | None,
    voters: str | None,
    bench: str,
    *,
    soft: bool = False,
    style: bool = False,
) -> str:
    """Ratings of two runs compare only on the same scale: anchor, voters (the judge), benchmark,
    outcome kind and style control."""
    if anchor is None:
        return "unanchored"
    scale = f"anchor={anchor[0]}@{anchor[1]:g};judge={voters};bench={bench}"
    scale += ";outcomes=soft" if soft else ""
    return scale + (";style=controlled" if style else "")


def _voters(df: pd.DataFrame, judge_model: str | None) -> str:
    """Who voted in a battle set, for its rating scale: the judge model, "human", or both."""
    sources = set(df["source"])
    parts = ([str(judge_model)] if "judge" in sources else []) + (
        ["human"] if "human" in sources else []
    )
    return "+".join(parts)


def _ci_rows(point: pd.Series, boot: pd.DataFrame, level: float) -> dict[str, dict[str, Any]]:
    """Per model: the CI-aware rank, the point rating and the bootstrap interval."""
    ci = bootstrap_intervals(boot, level)
    rank = ci_rank(ci["lower"], ci["upper"])
    return {
        m: {
            "rank": int(rank[m]),
            "rating": float(point[m]),
            "ci_lower": float(ci.loc[m, "lower"]),
            "ci_upper": float(ci.loc[m, "upper"]),
        }
        for m in point.index
    }


def _record(df: pd.DataFrame, model: str) -> dict[str, Any]:
    """A model's battles, wins, ties, losses and win rate (a tie counts half)."""
    as_a, as_b = df["model_a"] == model, df["model_b"] == model
    n = int((as_a | as_b).sum())
    wins = int(((as_a & (df["winner"] == "model_a")) | (as_b & (df["winner"] == "model_b"))).sum())
    ties = int(((as_a | as_b) & df["winner"].isin(["tie", "tie (bothbad)"])).sum())
    return {
        "battles": n,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "win_rate": (wins + 0.5 * ties) / n if n else None,
    }


def fit_ratings(
    r: Any, bench: str, df: pd.DataFrame, judge_model: str | None, scores: dict[str, Any]
) -> dict[str, Any]:
    """BT rating with bootstrap CI, online Elo, CI-aware rank and win counts on one battle set
    (`r`: the `rating` config section; `bench`: the benchmark, part of the rating scale)."""
    models = sorted(set(df["model_a"]) | set(df["model_b"]))
    anchor, anchor_note = fit_anchor(r.anchor, models)
    if anchor is None and r.anchor is not None:
        log.warning(anchor_note)
    kw = {"scale": r.scale, "base": r.base, "init_rating": r.init_rating, "anchor": anchor}
    kw["soft"] = bool(r.soft_outcomes)
    point = compute_bt(df, l2=r.l2, **kw)
    boot = compute_bootstrap_bt(df, int(r.bootstrap_rounds), int(r.seed), l2=r.l2, **kw)
    raw = _ci_rows(point, boot, float(r.ci_level))
    style = fit_style(r, df, kw)
    elo = compute_elo(df, k=r.k, scale=r.scale, base=r.base, init_rating=r.init_rating)
    rows = []
    for model in point.index:
        row = {"model": model, **raw[model]}
        row = {k: row[k] for k in ("rank", "model", "rating", "ci_lower", "ci_upper")}
        if style["on"]:  # the style-controlled rating leads; the raw one stays beside it
            row = {
                "model": model,
                **{k: style["rows"][model][k] for k in CI_KEYS},
                **{f"raw_{k}": row[k] for k in CI_KEYS},
            }
        mt = scores.get(model) or {}
        rows.append(
            {
                **row,
                "elo": float(elo[model]),
                "mt_bench": mt.get("average"),
                "mt_bench_turn1": mt.get("turn1"),
                "mt_bench_turn2": mt.get("turn2"),
                **_record(df, model),
            }
        )
    rows.sort(key=lambda row: (row["rank"], -row["rating"]))
    if style["on"]:
        point, boot = style.pop("point"), style.pop("boot")
    style.pop("rows", None)
    return {
        "rows": rows,
        "point": point,
        "paired": paired_differences(boot, point, float(r.ci_level)),
        "anchor": anchor_note,
        "scale": rating_scale(
            anchor, _voters(df, judge_model), bench, soft=bool(r.soft_outcomes), style=style["on"]
        ),
        "battles": int(len(df)),
        "style": style,
    }


def fit_style(r: Any, df: pd.DataFrame, kw: dict[str, Any]) -> dict[str, Any]:
    """The style-controlled fit of a battle set (`rating.style_control`), or why there is none.

    It needs the answers' style counts on every battle: a set where some battles lack them is
    rated raw (mixing the two would rate different battles), with the count in the note."""
    if not r.style_control:
        return {"on": False, "note": "off (rating.style_control=false)"}
    with_style = df["conv_metadata"].map(has_style) if "conv_metadata" in df.columns else None
    missing = len(df) if with_style is None else int((~with_style).sum())
    if missing:
        return {
            "on": False,
            "note": f"raw ratings: {missing} of {len(df)} battle(s) lack the answers' style counts",
        }
    fit = compute_style_bt(df, l2=r.l2, **kw)
    boot, coefs = compute_bootstrap_style_bt(
        df, int(r.bootstrap_rounds), int(r.seed), l2=r.l2, **kw
    )
    level = float(r.ci_level)
    coef_ci = bootstrap_intervals(coefs, level) if len(coefs.columns) else None
    robust, robust_coef = sandwich_style_intervals(df, level, l2=r.l2, **kw)
    return {
        "on": True,
        "note": f"style-controlled ({', '.join(fit.coefficients) or 'no varying feature'})",
        "battles": fit.battles,
        "coefficients": {
            f: {
                "value": v,
                "ci_lower": float(coef_ci.loc[f, "lower"]),
                "ci_upper": float(coef_ci.loc[f, "upper"]),
                "sandwich_lower": float(robust_coef.loc[f, "lower"]),
                "sandwich_upper": float(robust_coef.loc[f, "upper"]),
            }
            for f, v in fit.coefficients.items()
        },
        # robust (sandwich) intervals beside the bootstrap's: no resampling, same level
        "sandwich": {
            m: {"ci_lower": float(row["lower"]), "ci_upper": float(row["upper"])}
            for m, row in robust.iterrows()
        },
        "rows": _ci_rows(fit.ratings, boot, level),
        "point": fit.ratings,
        "boot": boot,
    }
