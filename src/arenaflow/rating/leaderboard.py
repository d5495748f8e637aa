"""The leaderboard step: three boards (judge-only, human-only, combined), the `rating.promote_on`
board with every model's three ratings beside it, the length-controlled win rates, the judge's
bias figures, the judge-human agreement, the plots, one JSON report and an MLflow run.

`build_leaderboard(cfg, battles, scores)` resolves the config once; the helpers take plain values
and the `rating` section.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from arenaflow import io
from arenaflow.plots import write_png
from arenaflow.rating.agreement import judge_human_agreement
from arenaflow.rating.bias import judge_bias
from arenaflow.rating.collect import calibration_summary, metric_name
from arenaflow.rating.counts import battle_count_matrix, win_fraction_matrix
from arenaflow.rating.fit import fit_ratings
from arenaflow.rating.length_control import length_controlled_win_rates
from arenaflow.rating.plots import heatmap_figure, rating_ci_figure
from arenaflow.rating.ratings import predicted_win_rate
from arenaflow.tracking import tracker_from_cfg

PLOTS = ("rating_ci", "win_fraction", "battle_count")
VIEWS = ("judge", "human", "combined")
OUTCOMES = {
    True: "soft: judged battles count as the judge's expected score where it gave probabilities",
    False: "hard: winner by the swap rule, a tie counts half",
}
VIEW_KEYS = ("rows", "scale", "anchor", "battles", "style")  # what the report keeps of each view
# what the step returns beside the report's own keys
RESULT_KEYS = (
    "rows",
    "rating_on",
    "scale",
    "anchor",
    "ratings",
    "paired",
    "style",
    "lc_win_rate",
    "judge_bias",
    "outcomes",
    "judge_calibration",
    "battles_by_source",
    "agreement",
)


def read_battles(uri: str) -> pd.DataFrame:
    df = pd.DataFrame(list(io.read_jsonl(uri)))
    if "source" not in df.columns:  # battles written before human votes were a source
        df["source"] = "judge"
    return df


def fit_views(
    r: Any,
    bench: str,
    subsets: dict[str, pd.DataFrame],
    judge_model: str | None,
    scores: dict[str, Any],
) -> dict[str, dict[str, Any] | None]:
    """Each view's fit (None without battles); a combined set equal to one source reuses its fit."""
    fits: dict[str, dict[str, Any] | None] = {}
    for view in VIEWS:
        sub = subsets[view].reset_index(drop=True)
        if sub.empty:
            fits[view] = None
        elif view == "combined" and fits["judge"] and len(sub) == fits["judge"]["battles"]:
            fits[view] = fits["judge"]  # no human battles: the same fit
        elif view == "combined" and fits["human"] and len(sub) == fits["human"]["battles"]:
            fits[view] = fits["human"]
        else:
            fits[view] = fit_ratings(r, bench, sub, judge_model, scores)
    return fits


def board_rows(
    main: dict[str, Any], by_view: dict[str, dict[str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The main board's rows with every view's rating, interval and battle count alongside."""
    rows = []
    for row in main["rows"]:
        row = dict(row)
        for v in VIEWS:
            other = by_view[v].get(row["model"])
            for key in ("rating", "ci_lower", "ci_upper", "battles"):
                row[f"{v}_{key}"] = other[key] if other else None
        rows.append(row)
    return rows


def _matrix_json(matrix: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    return {
        str(i): {str(c): (None if pd.isna(v) else float(v)) for c, v in row.items()}
        for i, row in matrix.iterrows()
    }


def board_metrics(
    report: dict[str, Any],
    fits: dict[str, dict[str, Any] | None],
    subsets: dict[str, pd.DataFrame],
) -> dict[str, float]:
    """The leaderboard's MLflow metrics: per model and view, style coefficients, agreement."""
    rows, agreement = report["rows"], report["agreement"]
    metrics = {"battles": float(report["battles"]), "models": float(len(rows))}
    for row in rows:
        for key in ("rating", "ci_lower", "ci_upper", "elo", "rank", "win_rate", "mt_bench"):
            if row[key] is not None:
                metrics[metric_name(f"{key}.{row['model']}")] = float(row[key])
    for v, fit in fits.items():
        metrics[f"battles_{v}"] = float(len(subsets[v]))
        for row in fit["rows"] if fit else []:
            for key in ("rating", "ci_lower", "ci_upper"):
                metrics[metric_name(f"{v}_{key}.{row['model']}")] = float(row[key])
    for feature, c in (report["style"].get("coefficients") or {}).items():
        metrics[f"style_coef_{feature}"] = float(c["value"])
    for row in rows if report["style"]["on"] else []:
        metrics[metric_name(f"raw_rating.{row['model']}")] = float(row["raw_rating"])
    for key in ("with_tie", "without_tie"):
        if agreement[key] is not None:
            metrics[f"agreement_{key}"] = float(agreement[key])
    return metrics


def log_leaderboard(
    run: Any, report: dict[str, Any], figures: dict[str, Any], metrics: dict[str, float]
) -> None:
    run.log_metrics(metrics)
    run.set_tags(
        {"arenaflow.rating_scale": report["scale"], "arenaflow.rating_on": report["rating_on"]}
    )
    run.log_table(report["rows"], "leaderboard.json")
    if report["agreement"]["pairs"]:
        run.log_table(report["agreement"]["pairs"], "agreement.json")
    run.log_dict(report, "leaderboard_full.json")
    for name in PLOTS:
        run.log_figure(figures[name], f"plots/{name}.png")


def figures_and_matrices(
    r: Any, main: dict[str, Any], rows: list[dict[str, Any]], view_df: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """The plots (`PLOTS`) and the matrices the report keeps, in the board's model order."""
    order = [row["model"] for row in rows]
    matrices = {
        "win_fraction": win_fraction_matrix(view_df, order),
        "battle_count": battle_count_matrix(view_df, order),
        "predicted_win_rate": predicted_win_rate(main["point"][order], r.scale, r.base),
    }
    figures = {
        "rating_ci": rating_ci_figure(rows, float(r.ci_level)),
        "win_fraction": heatmap_figure(
            matrices["win_fraction"], "win fraction (A beats B, ties not won)", ".2f"
        ),
        "battle_count": heatmap_figure(matrices["battle_count"], "battle count", ".0f"),
    }
    return figures, matrices


def main_board(
    r: Any,
    primary: str,
    fits: dict[str, dict[str, Any] | None],
    subsets: dict[str, pd.DataFrame],
    judge_model: str | None,
) -> dict[str, Any]:
    """The `primary` board's rows with every view's rating beside them and the length-controlled
    win rate (against `rating.lc_baseline`), and the judge's bias figures."""
    by_view = {
        v: {row["model"]: row for row in fit["rows"]} if fit else {} for v, fit in fits.items()
    }
    rows = board_rows(fits[primary], by_view)
    baseline = str(r.get("lc_baseline") or "base")
    lc = length_controlled_win_rates(
        subsets[primary], baseline, l2=r.l2, soft=bool(r.soft_outcomes)
    )
    for row in rows:
        row["lc_win_rate"] = (lc.get(row["model"]) or {}).get("lc_win_rate")
    bias = judge_bias(
        subsets["judge"],
        fits["judge"]["style"] if fits["judge"] else None,
        judge_model,
        by_view["judge"],
        by_view["human"],
    )
    return {"rows": rows, "lc_win_rate": {"baseline": baseline, "models": lc}, "judge_bias": bias}


def build_leaderboard(
    cfg: DictConfig, battles: dict[str, Any], scores: dict[str, Any] | None
) -> dict[str, Any]:
    """Three leaderboards, judge-only, human-only and combined (each BT with bootstrap CI, online
    Elo, CI-aware rank), the judge-human agreement, and `rows`: the `rating.promote_on` board with
    every model's three ratings alongside (`judge_rating`, `human_ci_lower`, ...)."""
    r = cfg.rating
    primary = str(r.promote_on)
    if primary not in VIEWS:
        raise ValueError(f"rating.promote_on must be one of {list(VIEWS)}, got {primary!r}")
    out_dir = io.artifact_uri(cfg, "rating")
    df = read_battles(battles["uri"])
    judge_model = battles.get("judge_model")
    subsets = {
        "judge": df[df["source"] == "judge"],
        "human": df[df["source"] == "human"],
        "combined": df,
    }
    score_map = (scores or {}).get("scores") or {}
    fits = fit_views(r, str(cfg.evaluate.bench_name), subsets, judge_model, score_map)
    main = fits[primary]
    if main is None:
        raise ValueError(
            f"rating.promote_on={primary} but there are no {primary} battles "
            f"(battles by source: {dict(Counter(df['source']))}); "
            "set rating.promote_on=combined, or collect votes first"
        )
    board = main_board(r, primary, fits, subsets, judge_model)
    figures, matrices = figures_and_matrices(r, main, board["rows"], subsets[primary])
    plots = {name: f"{out_dir}/plots/{name}.png" for name in PLOTS}
    for name in PLOTS:
        write_png(plots[name], figures[name])
    uri = f"{out_dir}/leaderboard.json"
    report = {
        "rows": board["rows"],
        "rating_on": primary,
        "scale": main["scale"],
        "anchor": main["anchor"],
        "ci_level": float(r.ci_level),
        "outcomes": OUTCOMES[bool(r.soft_outcomes)],
        "bootstrap_rounds": int(r.bootstrap_rounds),
        "battles": main["battles"],
        "battles_by_source": {v: len(subsets[v]) for v in ("judge", "human")},
        "battles_uri": battles["uri"],
        **{name: _matrix_json(m) for name, m in matrices.items()},
        "ratings": {
            v: None if fit is None else {k: fit[k] for k in VIEW_KEYS} for v, fit in fits.items()
        },
        "paired": main["paired"],
        "style": main["style"],
        "lc_win_rate": board["lc_win_rate"],
        "judge_bias": board["judge_bias"],
        "judge_calibration": battles.get("judge_calibration") or calibration_summary(None),
        "agreement": judge_human_agreement(df.to_dict("records")),
    }
    io.write_json(uri, report)
    with tracker_from_cfg(cfg).start_run("leaderboard", cfg) as run:
        log_leaderboard(run, report, figures, board_metrics(report, fits, subsets))
        run_id, run_url = run.run_id, run.url
    return {
        "uri": uri,
        **{k: report[k] for k in RESULT_KEYS},
        "plots": plots,
        "battles_uri": battles["uri"],
        "pair_uri": battles.get("pair_uri"),
        "judge_model": battles.get("judge_model"),
        "run_id": run_id,
        "run_url": run_url,
    }
