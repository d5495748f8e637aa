"""The rating stage: battles -> leaderboard -> champion, each step a function the Dagster asset of
the same name calls, and `run(cfg)` chaining all three for `python -m arenaflow.rating`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from arenaflow import io
from arenaflow.plots import to_png
from arenaflow.rating import battles as bt_io
from arenaflow.rating.plots import heatmap_figure, rating_ci_figure
from arenaflow.rating.ratings import (
    battle_count_matrix,
    bootstrap_intervals,
    ci_rank,
    compute_bootstrap_bt,
    compute_bt,
    compute_elo,
    predicted_win_rate,
    win_fraction_matrix,
)
from arenaflow.tracking import tracker_from_cfg

log = logging.getLogger(__name__)

PLOTS = ("rating_ci", "win_fraction", "battle_count")


def metric_name(name: str) -> str:
    """An MLflow-safe metric name (model names may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]+", "_", name).strip("_ ")


def rating_uri(cfg: DictConfig, *parts: str) -> str:
    return io.artifact_uri(cfg, "rating", *parts)


def build_battles(cfg: DictConfig, judgments: dict[str, Any] | None) -> dict[str, Any]:
    """Battles from the pairwise judgments (swap rule) plus `rating.external_battles`, one file.

    Rows that cannot be a battle are counted per source and reason; the stage fails only when
    nothing usable is left, naming what to fix.
    """
    invalid: dict[str, dict[str, int]] = {}
    by_source: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    pair_uri = (judgments or {}).get("pair_uri")
    if pair_uri:
        if not io.exists(pair_uri):
            raise FileNotFoundError(
                f"pairwise judgments not found at {pair_uri}; materialize mt_bench_judgments "
                "with judge.mode including pairwise (python -m arenaflow.judge)"
            )
        counts: Counter[str] = Counter()
        records = bt_io.read_records(pair_uri, counts)
        rows.extend(bt_io.battles_from_pairwise(records, counts))
        by_source["mt_bench"] = counts.pop("valid", 0)
        invalid["mt_bench"] = dict(counts)
    for uri in cfg.rating.external_battles or []:
        if not io.exists(uri):
            raise FileNotFoundError(
                f"external battle file {uri} (rating.external_battles) does not exist; "
                "fix the URI or remove it from rating.external_battles"
            )
        counts = Counter()
        rows.extend(bt_io.battles_from_records(bt_io.read_records(uri, counts), uri, counts))
        by_source[uri] = counts.pop("valid", 0)
        invalid[uri] = dict(counts)
    for source, reasons in invalid.items():
        for reason, n in reasons.items():
            log.warning("%s: %d row(s) not used as battles: %s", source, n, reason)
    if not rows:
        raise ValueError(
            f"no valid battles (invalid rows by source and reason: {invalid}); "
            "check the judge's pairwise output or rating.external_battles"
        )
    rows = bt_io.order_battles(rows)
    uri = rating_uri(cfg, "battles.jsonl")
    io.write_jsonl(uri, rows)
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    winners = dict(Counter(r["winner"] for r in rows))
    result = {
        "uri": uri,
        "count": len(rows),
        "models": models,
        "by_source": by_source,
        "invalid": invalid,
        "winners": winners,
        "pair_uri": pair_uri,
        "judge_model": (judgments or {}).get("judge_model"),
    }
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("battles", cfg) as run:
        run.log_metrics(
            {"battles": len(rows), **{metric_name(f"battles.{k}"): v for k, v in winners.items()}}
        )
        run.log_dict(result, "battles_summary.json")
        result["run_id"], result["run_url"] = run.run_id, run.url
    return result


def _anchor(cfg: DictConfig, models: list[str]) -> tuple[tuple[str, float] | None, str]:
    """The anchor to fit with, and why when the configured one cannot be used."""
    a = cfg.rating.anchor
    if a is None or a.get("model") is None:
        return None, "unanchored (rating.anchor is null)"
    if a.model not in models:
        return None, (
            f"unanchored: rating.anchor.model {a.model!r} has no battles "
            f"(models: {models}); name a competitor or set rating.anchor=null"
        )
    return (str(a.model), float(a.rating)), f"anchored: {a.model} = {float(a.rating):g}"


def rating_scale(cfg: DictConfig, anchor: tuple[str, float] | None, judge_model: str | None) -> str:
    """Ratings of two runs compare only on the same scale: anchor, judge and benchmark."""
    if anchor is None:
        return "unanchored"
    return f"anchor={anchor[0]}@{anchor[1]:g};judge={judge_model};bench={cfg.eval.bench_name}"


def build_leaderboard(
    cfg: DictConfig, battles: dict[str, Any], scores: dict[str, Any] | None
) -> dict[str, Any]:
    """BT rating with bootstrap CI, online Elo, CI-aware rank, MT-bench score and win rates per model."""
    r = cfg.rating
    df = pd.DataFrame(list(io.read_jsonl(battles["uri"])))
    models = sorted(set(df["model_a"]) | set(df["model_b"]))
    anchor, anchor_note = _anchor(cfg, models)
    if anchor is None and r.anchor is not None:
        log.warning(anchor_note)
    kw = {"scale": r.scale, "base": r.base, "init_rating": r.init_rating, "anchor": anchor}
    point = compute_bt(df, l2=r.l2, **kw)
    boot = compute_bootstrap_bt(df, int(r.bootstrap_rounds), int(r.seed), l2=r.l2, **kw)
    ci = bootstrap_intervals(boot, float(r.ci_level))
    rank = ci_rank(ci["lower"], ci["upper"])
    elo = compute_elo(df, k=r.k, scale=r.scale, base=r.base, init_rating=r.init_rating)
    score_map = (scores or {}).get("scores") or {}
    rows = []
    for model in point.index:
        as_a, as_b = df["model_a"] == model, df["model_b"] == model
        n = int((as_a | as_b).sum())
        wins = int(
            ((as_a & (df["winner"] == "model_a")) | (as_b & (df["winner"] == "model_b"))).sum()
        )
        ties = int(((as_a | as_b) & df["winner"].isin(["tie", "tie (bothbad)"])).sum())
        mt = score_map.get(model) or {}
        rows.append(
            {
                "rank": int(rank[model]),
                "model": model,
                "rating": float(point[model]),
                "ci_lower": float(ci.loc[model, "lower"]),
                "ci_upper": float(ci.loc[model, "upper"]),
                "elo": float(elo[model]),
                "mt_bench": mt.get("average"),
                "mt_bench_turn1": mt.get("turn1"),
                "mt_bench_turn2": mt.get("turn2"),
                "battles": n,
                "wins": wins,
                "ties": ties,
                "losses": n - wins - ties,
                "win_rate": (wins + 0.5 * ties) / n if n else None,
            }
        )
    rows.sort(key=lambda row: (row["rank"], -row["rating"]))
    order = [row["model"] for row in rows]
    win_frac = win_fraction_matrix(df, order)
    counts = battle_count_matrix(df, order)
    predicted = predicted_win_rate(point[order], r.scale, r.base)
    scale = rating_scale(cfg, anchor, battles.get("judge_model"))
    level = float(r.ci_level)
    figures = {
        "rating_ci": rating_ci_figure(rows, level),
        "win_fraction": heatmap_figure(win_frac, "win fraction (A beats B, ties not won)", ".2f"),
        "battle_count": heatmap_figure(counts, "battle count", ".0f"),
    }
    plots = {}
    for name, fig in figures.items():
        plots[name] = rating_uri(cfg, "plots", f"{name}.png")
        png = to_png(fig)
        fs, path = io.fs_for(plots[name])
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(png)
    uri = rating_uri(cfg, "leaderboard.json")
    report = {
        "rows": rows,
        "scale": scale,
        "anchor": anchor_note,
        "ci_level": level,
        "bootstrap_rounds": int(r.bootstrap_rounds),
        "battles": int(len(df)),
        "battles_uri": battles["uri"],
        "win_fraction": _matrix_json(win_frac),
        "battle_count": _matrix_json(counts),
        "predicted_win_rate": _matrix_json(predicted),
    }
    io.write_json(uri, report)
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("leaderboard", cfg) as run:
        metrics = {"battles": float(len(df)), "models": float(len(rows))}
        for row in rows:
            for key in ("rating", "ci_lower", "ci_upper", "elo", "rank", "win_rate", "mt_bench"):
                if row[key] is not None:
                    metrics[metric_name(f"{key}.{row['model']}")] = float(row[key])
        run.log_metrics(metrics)
        run.set_tags({"arenaflow.rating_scale": scale})
        run.log_table(rows, "leaderboard.json")
        run.log_dict(report, "leaderboard_full.json")
        for name in PLOTS:
            run.log_figure(figures[name], f"plots/{name}.png")
        run_id, run_url = run.run_id, run.url
    return {
        "uri": uri,
        "rows": rows,
        "scale": scale,
        "anchor": anchor_note,
        "plots": plots,
        "battles_uri": battles["uri"],
        "pair_uri": battles.get("pair_uri"),
        "judge_model": battles.get("judge_model"),
        "run_id": run_id,
        "run_url": run_url,
    }


def _matrix_json(matrix: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    return {
        str(i): {str(c): (None if pd.isna(v) else float(v)) for c, v in row.items()}
        for i, row in matrix.iterrows()
    }
