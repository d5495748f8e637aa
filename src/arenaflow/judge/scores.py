"""MT-bench scores from judgment records (FastChat `show_result` semantics) and judge health.

Single grading: per model the mean score of turn 1, of turn 2, and of all scored turns together;
unparsed scores (-1) are excluded and counted. Pairwise: a pair counts for a model when both
orders agree; disagreement or a tie is a tie; win rate counts a tie as half.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def single_scores(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{model: {turn1, turn2, average, scored, unparsed}} (FastChat's show_result)."""
    by_model: dict[str, dict[int, list[float]]] = defaultdict(lambda: {1: [], 2: []})
    expected: dict[str, list[float]] = defaultdict(list)
    unparsed: dict[str, int] = defaultdict(int)
    for row in rows:
        model = row["model"]
        by_model[model]  # noqa: B018 - a model with only unparsed scores still gets a row
        if row["score"] is None or row["score"] == -1:
            unparsed[model] += 1
            continue
        by_model[model][int(row["turn"])].append(float(row["score"]))
        if row.get("expected_score") is not None:
            expected[model].append(float(row["expected_score"]))
    return {
        model: {
            "turn1": _mean(turns[1]),
            "turn2": _mean(turns[2]),
            "average": _mean(turns[1] + turns[2]),
            # the probability-weighted rating where the judge gave probabilities (beside the
            # argmax average, which stays FastChat's MT-bench score)
            "expected": _mean(expected[model]),
            "scored": len(turns[1]) + len(turns[2]),
            "unparsed": unparsed[model],
        }
        for model, turns in sorted(by_model.items())
    }


def category_scores(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{model: {category: mean score over both turns}}, unparsed scores excluded."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["score"] is None or row["score"] == -1:
            continue
        acc[row["model"]][row.get("category") or "unknown"].append(float(row["score"]))
    return {m: {c: float(np.mean(v)) for c, v in sorted(cats.items())} for m, cats in acc.items()}


def pairwise_results(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{model: {win, loss, tie, error, win_rate, win_rate_adjusted}}; a pair with an unparsed
    order is counted under `error` and left out of the rates."""
    stats: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"win": 0, "loss": 0, "tie": 0, "error": 0}
    )
    for row in rows:
        m1, m2 = row["model_1"], row["model_2"]
        g1, g2 = row["g1_winner"], row["g2_winner"]
        if "error" in (g1, g2):
            stats[m1]["error"] += 1
            stats[m2]["error"] += 1
        elif g1 == "tie" or g1 != g2:
            stats[m1]["tie"] += 1
            stats[m2]["tie"] += 1
        else:
            winner, loser = (m1, m2) if g1 == "model_1" else (m2, m1)
            stats[winner]["win"] += 1
            stats[loser]["loss"] += 1
    for s in stats.values():
        n = s["win"] + s["loss"] + s["tie"]
        s["win_rate"] = s["win"] / n if n else None
        s["win_rate_adjusted"] = (s["win"] + 0.5 * s["tie"]) / n if n else None
    return dict(sorted(stats.items()))


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    r = float(np.corrcoef(xs, ys)[0, 1])
    return None if math.isnan(r) else r


def judge_health(
    single_rows: list[dict[str, Any]], pair_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Parse-failure rate, logprob recoveries, position consistency and length bias of a judge."""
    verdicts = [r.get("verdict_source") for r in single_rows if not r.get("error")]
    for r in pair_rows:
        verdicts += [r.get(f"{g}_verdict_source") for g in ("g1", "g2") if not r.get(f"{g}_error")]
    replies = len(verdicts)
    text_failures = sum(1 for v in verdicts if v != "text")
    unresolved = sum(1 for v in verdicts if v not in ("text", "logprobs"))
    both = [r for r in pair_rows if "error" not in (r["g1_winner"], r["g2_winner"])]
    consistent = sum(1 for r in both if r["g1_winner"] == r["g2_winner"])
    scored = [r for r in single_rows if r["score"] not in (None, -1)]
    return {
        "replies": replies,
        "parse_failures": text_failures,
        "parse_failure_rate": text_failures / replies if replies else None,
        "recovered_by_logprobs": text_failures - unresolved,
        "unresolved": unresolved,
        "unresolved_rate": unresolved / replies if replies else None,
        "pairs_with_both_orders": len(both),
        "position_consistency": consistent / len(both) if both else None,
        "length_bias": _pearson(
            [float(r.get("answer_len", 0)) for r in scored], [float(r["score"]) for r in scored]
        ),
    }


def radar_figure(categories: dict[str, dict[str, float]], title: str = "MT-bench by category"):
    """A radar plot: one polygon per model over the categories it was scored on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted({c for per in categories.values() for c in per})
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(111, polar=True)
    if cats:
        angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
        for model, per in sorted(categories.items()):
            values = [per.get(c, 0.0) for c in cats]
            ax.plot([*angles, angles[0]], [*values, values[0]], marker="o", label=model)
            ax.fill([*angles, angles[0]], [*values, values[0]], alpha=0.1)
        ax.set_xticks(angles)
        ax.set_xticklabels(cats)
    ax.set_ylim(0, 10)
    ax.set_title(title)
    if categories:
        ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1))
    return fig
