"""What the rating steps show a person: the asset value each step hands on, and its metadata as
plain values and `arenaflow.report` tables (the Dagster assets convert them; nothing here knows
Dagster)."""

from __future__ import annotations

from typing import Any

from arenaflow import io
from arenaflow.rating.promote import promotion_rule
from arenaflow.report import Image, Markdown, Path, Table

LEADERBOARD_COLUMNS = [
    "rank",
    "model",
    "rating",
    "ci_lower",
    "ci_upper",
    "elo",
    "mt_bench",
    "battles",
    "wins",
    "ties",
    "losses",
    "win_rate",
    "lc_win_rate",
]
VIEWS = ("judge", "human", "combined")
RAW_COLUMNS = ["raw_rating", "raw_ci_lower", "raw_ci_upper"]  # beside a style-controlled rating
BATTLES_VALUE = (
    "uri",
    "count",
    "models",
    "by_source",
    "pair_uri",
    "judge_model",
    "human_votes",
    "judge_calibration",
)
LEADERBOARD_VALUE = (
    "uri",
    "rows",
    "scale",
    "rating_on",
    "battles_uri",
    "pair_uri",
    "judge_model",
    "run_id",
    "paired",
    "style",
    "outcomes",
    "judge_calibration",
    "battles_by_source",
)
CHAMPION_VALUE = (
    "model_uri",
    "version",
    "promoted",
    "outcome",
    "reason",
    "served_role",
    "challenger",
    "challenger_version",
    "incumbent_version",
    "diff",
    "diff_lower",
    "diff_upper",
    "p_better",
    "ci_level",
    "competitor_versions",
    "run_id",
)
DECISION_FIELDS = (
    "outcome",
    "challenger",
    "challenger_version",
    "challenger_rating",
    "incumbent",
    "incumbent_version",
    "incumbent_rating",
    "diff",
    "diff_lower",
    "diff_upper",
    "p_better",
    "comparison",
    "margin",
    "ci_level",
    "version",
    "served_role",
)


def style_table(style: dict[str, Any]) -> Markdown:
    """The style coefficients: how much the voters reward a feature (logit per standard deviation
    of the style difference in a model's favour), with the bootstrap interval."""
    if not style.get("on"):
        return Markdown(f"_{style.get('note', 'style control off')}_")
    rows = [
        {
            "feature": f,
            "coefficient": f"{c['value']:+.3f}",
            "interval": f"[{c['ci_lower']:+.3f}, {c['ci_upper']:+.3f}]",
            "sandwich interval": f"[{c['sandwich_lower']:+.3f}, {c['sandwich_upper']:+.3f}]"
            if "sandwich_lower" in c
            else "",
        }
        for f, c in style["coefficients"].items()
    ]
    return Markdown(Table(rows, empty="_no feature varied_", note=style["note"]).markdown())


def ratings_table(ratings: dict[str, dict[str, Any] | None]) -> Table:
    """One line per model (best combined rating first): its judge-only, human-only and combined
    rating with CI and battles; blank where the model has no battles of that source."""
    by_view = {
        v: {r["model"]: r for r in (fit or {}).get("rows", [])} for v, fit in ratings.items()
    }
    order = [r["model"] for r in (ratings.get("combined") or {}).get("rows", [])]
    order += sorted({m for rows in by_view.values() for m in rows} - set(order))
    table = []
    for model in order:
        line: dict[str, Any] = {"model": model}
        for v in VIEWS:
            r = by_view.get(v, {}).get(model)
            line[v] = f"{r['rating']:.1f}" if r else ""
            line[f"{v} CI"] = f"[{r['ci_lower']:.1f}, {r['ci_upper']:.1f}]" if r else ""
        line["judge battles"] = by_view.get("judge", {}).get(model, {}).get("battles", 0)
        line["human battles"] = by_view.get("human", {}).get(model, {}).get("battles", 0)
        table.append(line)
    return Table(table)


def bias_table(bias: dict[str, Any]) -> Table:
    """The judge-health figures: length, position and self preference."""
    length = bias.get("length_preference")
    pos = bias.get("position_preference") or {}
    own = bias.get("self_preference") or {}
    rows = [
        {
            "bias": "length",
            "figure": f"{length['value']:+.3f}" if length else "n/a",
            "interval": f"[{length['ci_lower']:+.3f}, {length['ci_upper']:+.3f}]" if length else "",
            "reads": "logit per SD of length difference; 0 = length ignored"
            if length
            else bias.get("length_note", ""),
        },
        {
            "bias": "position",
            "figure": f"{pos['first_share']:.3f}" if pos.get("first_share") is not None else "n/a",
            "interval": f"[{pos['interval'][0]:.3f}, {pos['interval'][1]:.3f}]"
            if pos.get("interval")
            else "",
            "reads": f"share of {pos.get('games', 0)} decisive games won by the first answer; 0.5 = none"
            + (" (biased)" if pos.get("biased") else ""),
        },
        {
            "bias": "self",
            "figure": f"{own['judge_minus_human']:+.1f}" if "judge_minus_human" in own else "n/a",
            "interval": "",
            "reads": "judge's rating of itself minus the voters'"
            if own.get("competitor")
            else "the judge is not a competitor",
        },
    ]
    return Table(rows)


def paired_table(paired: dict[str, dict[str, dict[str, float]]]) -> Table:
    """rating(a) - rating(b) with its paired bootstrap interval and P(a > b), each pair once."""
    rows, seen = [], set()
    for a, others in paired.items():
        for b, p in others.items():
            if (b, a) in seen:
                continue
            seen.add((a, b))
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "a - b": f"{p['diff']:+.1f}",
                    "interval": f"[{p['lower']:+.1f}, {p['upper']:+.1f}]",
                    "P(a > b)": f"{p['p_better']:.2f}",
                }
            )
    return Table(rows, empty="_one model: nothing to compare_")


def leaderboard_table(out: dict[str, Any]) -> Table:
    """The leaderboard rows (raw ratings beside style-controlled ones), opening with a warning
    when the judge failed calibration."""
    columns = LEADERBOARD_COLUMNS
    if out["style"]["on"]:
        columns = LEADERBOARD_COLUMNS[:5] + RAW_COLUMNS + LEADERBOARD_COLUMNS[5:]
    calibration = out["judge_calibration"]
    note = ""
    if not calibration.get("passed"):
        note = f"**Uncalibrated judge: these ratings cannot move the champion.** {calibration['summary']}"
    return Table(out["rows"], columns, note=note)


def battles_metadata(out: dict[str, Any]) -> dict[str, Any]:
    """The battles step's metadata: counts by source, origin and winner, the human votes, and
    every battle that could not be used, counted by reason."""
    human = out["human_votes"]
    invalid = [
        {"origin": src, "reason": reason, "count": n}
        for src, reasons in out["invalid"].items()
        for reason, n in sorted(reasons.items())
    ]
    return {
        "uri": Path(out["uri"]),
        "count": out["count"],
        "models": out["models"],
        "by_source": Table([{"source": s, "battles": n} for s, n in out["by_source"].items()]),
        "by_origin": Table([{"origin": s, "battles": n} for s, n in out["by_origin"].items()]),
        "judge_battles": out["by_source"]["judge"],
        "human_battles": out["by_source"]["human"],
        "human_votes": human["votes"],
        "human_votes_db": str(human["db"]),
        "human_votes_note": human["note"],
        "human_battles_with_other_models": human.get("battles_with_other_models", 0),
        "human_models_not_competitors": human.get("not_competitors", {}),
        "winners": Table([{"winner": w, "count": n} for w, n in sorted(out["winners"].items())]),
        "invalid": Table(invalid, empty="_none_"),
        "invalid_total": sum(r["count"] for r in invalid),
    }


def _agreement(agreement: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "agreement": Table(
            agreement["pairs"], empty="_no model pair has both judge and human votes yet_"
        ),
        "agreement_shared_pairs": agreement["shared_pairs"],
    }
    for key in ("with_tie", "without_tie"):
        if agreement[key] is not None:
            meta[f"agreement_{key}"] = float(agreement[key])
    return meta


def leaderboard_metadata(out: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard step's metadata: the board, each view's ratings, judge bias and agreement,
    paired differences, plots, and the win-rate matrix."""
    report = io.read_json(out["uri"])
    top = out["rows"][0]
    calibration = out["judge_calibration"]
    plots = out["plots"]
    return {
        "uri": Path(out["uri"]),
        "leaderboard": leaderboard_table(out),
        "style_control": style_table(out["style"]),
        "judge_bias": bias_table(out["judge_bias"]),
        "lc_baseline": out["lc_win_rate"]["baseline"],
        "judge_calibrated": bool(calibration.get("passed")),
        "judge_calibration": str(calibration["summary"]),
        "paired_differences": paired_table(out["paired"]),
        "outcomes": out["outcomes"],
        "rating_on": out["rating_on"],
        "ratings": ratings_table(out["ratings"]),
        **{
            f"{v}_scale": fit["scale"] if fit else "no battles" for v, fit in out["ratings"].items()
        },
        **_agreement(out["agreement"]),
        "top_model": top["model"],
        "top_rating": float(top["rating"]),
        "models": len(out["rows"]),
        **{k: report[k] for k in ("battles", "bootstrap_rounds")},
        "rating_scale": out["scale"],
        "anchor": out["anchor"],
        "rating_ci": Image("rating with CI", uri=plots["rating_ci"]),
        "win_fraction": Image("win fraction", uri=plots["win_fraction"]),
        "battle_count": Image("battle count", uri=plots["battle_count"]),
        "predicted_win_rate": Table(
            [{"model": m, **row} for m, row in report["predicted_win_rate"].items()]
        ),
    }


def champion_metadata(out: dict[str, Any]) -> dict[str, Any]:
    """The promotion step's metadata: the outcome and its reason, the decision's figures, and the
    rule it applied."""
    calibration = out.get("judge_calibration") or {}
    return {
        "promoted": out["promoted"],
        "outcome": out["outcome"],
        "reason": Markdown(out["reason"]),
        "model_uri": str(out["model_uri"]),
        "champion_version": str(out["version"]),
        "served": f"v{out['version']} ({out['served_role']})" if out["version"] else "nothing",
        "p_better": float(out["p_better"]) if out["p_better"] is not None else None,
        "decision": Table([{"field": k, "value": out[k]} for k in DECISION_FIELDS]),
        "judge_calibrated": bool(calibration.get("passed")),
        "judge_calibration": str(calibration.get("summary")),
        "rule": Markdown(promotion_rule(out["margin"], out["scale"])),
        "competitor_versions": out["competitor_versions"],
        "not_candidates": out["not_candidates"],
    }
