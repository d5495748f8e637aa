"""Dagster assets of the rating group: battles, the leaderboard, and the eval-gated `champion`
alias. Each calls one step of `arenaflow.rating`, the library `python -m arenaflow.rating` runs.
The vote sensor refreshes battles + leaderboard when the arena has collected enough new votes."""

from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.arena import VoteStore, database_exists, safe_url, vote_db_url
from arenaflow.rating import build_battles, build_leaderboard, promote_champion
from pipelines.metadata import md_table, mlflow_link, png_md
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "rating"}
CODE_VERSION = source_version(__file__)
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


def style_table(style: dict[str, Any]) -> str:
    """The style coefficients: how much the voters reward a feature (logit per standard deviation
    of the style difference in a model's favour), with the bootstrap interval."""
    if not style.get("on"):
        return f"_{style.get('note', 'style control off')}_"
    rows = [
        {
            "feature": f,
            "coefficient": f"{c['value']:+.3f}",
            "interval": f"[{c['ci_lower']:+.3f}, {c['ci_upper']:+.3f}]",
        }
        for f, c in style["coefficients"].items()
    ]
    return f"{style['note']}\n\n" + (md_table(rows) if rows else "_no feature varied_")


def ratings_table(ratings: dict[str, dict[str, Any] | None]) -> str:
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
    return md_table(table)


def bias_table(bias: dict[str, Any]) -> str:
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
    return md_table(rows)


def paired_table(paired: dict[str, dict[str, dict[str, float]]]) -> str:
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
    return md_table(rows) if rows else "_one model: nothing to compare_"


def _calibration_note(calibration: dict[str, Any]) -> str:
    if calibration.get("passed"):
        return ""
    return f"**Uncalibrated judge: these ratings cannot move the champion.** {calibration['summary']}\n\n"


def _png(uri: str) -> bytes:
    fs, path = io.fs_for(uri)
    with fs.open(path, "rb") as f:
        return f.read()


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"python"},
    description="Battles (FastChat columns, source judge|human) from pairwise judgments by the swap rule, external battle files and the arena's human votes.",
)
def battles(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    mt_bench_judgments: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Battles (FastChat columns, source judge|human) from pairwise judgments by the swap rule,
    external battle files and the arena's human votes."""
    cfg, meta = stage_config(context, hydra, config)
    out = build_battles(cfg, mt_bench_judgments)
    human = out["human_votes"]
    context.log.info("human votes: %s", human["note"])
    invalid_rows = [
        {"origin": src, "reason": reason, "count": n}
        for src, reasons in out["invalid"].items()
        for reason, n in sorted(reasons.items())
    ]
    return dg.Output(
        value={
            k: out[k]
            for k in (
                "uri",
                "count",
                "models",
                "by_source",
                "pair_uri",
                "judge_model",
                "human_votes",
                "judge_calibration",
            )
        },
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(out["uri"]),
            "count": out["count"],
            "models": dg.MetadataValue.json(out["models"]),
            "by_source": dg.MetadataValue.md(
                md_table([{"source": s, "battles": n} for s, n in out["by_source"].items()])
            ),
            "by_origin": dg.MetadataValue.md(
                md_table([{"origin": s, "battles": n} for s, n in out["by_origin"].items()])
            ),
            "judge_battles": out["by_source"]["judge"],
            "human_battles": out["by_source"]["human"],
            "human_votes": human["votes"],
            "human_votes_db": dg.MetadataValue.text(str(human["db"])),
            "human_votes_note": dg.MetadataValue.text(human["note"]),
            "human_battles_with_other_models": human.get("battles_with_other_models", 0),
            "human_models_not_competitors": dg.MetadataValue.json(human.get("not_competitors", {})),
            "winners": dg.MetadataValue.md(
                md_table([{"winner": w, "count": n} for w, n in sorted(out["winners"].items())])
            ),
            "invalid": dg.MetadataValue.md(md_table(invalid_rows) if invalid_rows else "_none_"),
            "invalid_total": sum(r["count"] for r in invalid_rows),
            **mlflow_link(out.get("run_url")),
        },
    )


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"python", "mlflow"},
    description="Leaderboard: Bradley–Terry rating with bootstrap CI (judge-only, human-only, combined), online Elo, CI-aware rank, MT-bench score, win rate, judge-human agreement.",
)
def leaderboard(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    battles: dict[str, Any],
    mt_bench_scores: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Leaderboard: Bradley–Terry rating with bootstrap CI (judge-only, human-only, combined),
    online Elo, CI-aware rank, MT-bench score, win rate, judge-human agreement."""
    cfg, meta = stage_config(context, hydra, config)
    out = build_leaderboard(cfg, battles, mt_bench_scores)
    report = io.read_json(out["uri"])
    matrix_rows = [{"model": m, **row} for m, row in report["predicted_win_rate"].items()]
    top = out["rows"][0]
    agreement = out["agreement"]
    agreement_meta: dict[str, Any] = {
        "agreement": dg.MetadataValue.md(
            md_table(agreement["pairs"])
            if agreement["pairs"]
            else "_no model pair has both judge and human votes yet_"
        ),
        "agreement_shared_pairs": agreement["shared_pairs"],
    }
    for key in ("with_tie", "without_tie"):
        if agreement[key] is not None:
            agreement_meta[f"agreement_{key}"] = float(agreement[key])
    return dg.Output(
        value={
            k: out[k]
            for k in (
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
        },
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(out["uri"]),
            "leaderboard": dg.MetadataValue.md(
                _calibration_note(out["judge_calibration"])
                + md_table(
                    out["rows"],
                    LEADERBOARD_COLUMNS[:5] + RAW_COLUMNS + LEADERBOARD_COLUMNS[5:]
                    if out["style"]["on"]
                    else LEADERBOARD_COLUMNS,
                )
            ),
            "style_control": dg.MetadataValue.md(style_table(out["style"])),
            "judge_bias": dg.MetadataValue.md(bias_table(out["judge_bias"])),
            "lc_baseline": dg.MetadataValue.text(out["lc_win_rate"]["baseline"]),
            "judge_calibrated": bool(out["judge_calibration"].get("passed")),
            "judge_calibration": dg.MetadataValue.text(str(out["judge_calibration"]["summary"])),
            "paired_differences": dg.MetadataValue.md(paired_table(out["paired"])),
            "outcomes": dg.MetadataValue.text(out["outcomes"]),
            "rating_on": dg.MetadataValue.text(out["rating_on"]),
            "ratings": dg.MetadataValue.md(ratings_table(out["ratings"])),
            **{
                f"{v}_scale": dg.MetadataValue.text(fit["scale"] if fit else "no battles")
                for v, fit in out["ratings"].items()
            },
            **agreement_meta,
            "top_model": top["model"],
            "top_rating": float(top["rating"]),
            "models": len(out["rows"]),
            "battles": report["battles"],
            "bootstrap_rounds": report["bootstrap_rounds"],
            "rating_scale": out["scale"],
            "anchor": out["anchor"],
            "rating_ci": png_md(_png(out["plots"]["rating_ci"]), "rating with CI"),
            "win_fraction": png_md(_png(out["plots"]["win_fraction"]), "win fraction"),
            "battle_count": png_md(_png(out["plots"]["battle_count"]), "battle count"),
            "predicted_win_rate": dg.MetadataValue.md(md_table(matrix_rows)),
            **mlflow_link(out.get("run_url")),
        },
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


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    kinds={"mlflow"},
    description="The registry alias `champion`: the base first, then a challenger that beats it in a paired bootstrap comparison judged by a calibrated judge.",
)
def champion_model(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    leaderboard: dict[str, Any],
    finetuned_model: dict[str, Any],
    base_model: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """The registry alias `champion`: the base first, then a challenger that beats it in a paired
    bootstrap comparison judged by a calibrated judge (rule: arenaflow.rating.promote)."""
    cfg, meta = stage_config(context, hydra, config)
    out = promote_champion(cfg, leaderboard, finetuned_model, base_model)
    context.log.info("champion: %s", out["reason"])
    calibration = out.get("judge_calibration") or {}
    return dg.Output(
        value={
            k: out[k]
            for k in (
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
        },
        metadata={
            **meta,
            "promoted": out["promoted"],
            "outcome": out["outcome"],
            "reason": dg.MetadataValue.md(out["reason"]),
            "model_uri": str(out["model_uri"]),
            "champion_version": str(out["version"]),
            "served": dg.MetadataValue.text(
                f"v{out['version']} ({out['served_role']})" if out["version"] else "nothing"
            ),
            **({"p_better": float(out["p_better"])} if out["p_better"] is not None else {}),
            "decision": dg.MetadataValue.md(
                md_table([{"field": k, "value": out[k]} for k in DECISION_FIELDS])
            ),
            "judge_calibrated": bool(calibration.get("passed")),
            "judge_calibration": dg.MetadataValue.text(str(calibration.get("summary"))),
            "rule": dg.MetadataValue.md(
                "The base model is the first champion. The best rated registered challenger "
                "replaces the champion only when the lower end of the paired bootstrap interval "
                f"of rating(challenger) - rating(champion) is above {out['margin']:g} "
                f"(`rating.promote_margin`), and only if the judge passed calibration; a champion "
                "that is not a competitor is compared through its version tags on the same scale "
                f"(this run: `{out['scale']}`)."
            ),
            "competitor_versions": dg.MetadataValue.json(out["competitor_versions"]),
            "not_candidates": dg.MetadataValue.json(out["not_candidates"]),
            **mlflow_link(out.get("run_url")),
        },
    )


rating_refresh_job = dg.define_asset_job(
    "rating_refresh_job",
    selection=dg.AssetSelection.assets(battles, leaderboard),
    description="Re-rate with the newest arena votes: battles + leaderboard (promotion waits for a full run).",
)


@dg.sensor(
    job=rating_refresh_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Refreshes battles + leaderboard once rating.vote_sensor.min_new_votes new arena votes have arrived.",
)
def arena_votes_sensor(
    context: dg.SensorEvaluationContext, hydra: HydraConfigResource
) -> dg.RunRequest | dg.SkipReason:
    """Refreshes battles + leaderboard once `rating.vote_sensor.min_new_votes` new arena votes
    have arrived; the cursor is the vote count of the last requested run (votes are never deleted)."""
    cfg = hydra.compose()
    if not cfg.rating.human_votes:
        return dg.SkipReason("rating.human_votes=false: human votes are not rated")
    url = vote_db_url(cfg)
    if not database_exists(url):
        return dg.SkipReason(f"no vote database at {safe_url(url)} yet")
    for key in ("mt_bench_judgments", "mt_bench_scores"):
        if context.instance.get_latest_materialization_event(dg.AssetKey(key)) is None:
            return dg.SkipReason(
                f"{key} was never materialized; run the pipeline once, then new votes refresh "
                "the leaderboard"
            )
    store = VoteStore(url)
    try:
        total = store.count()
    finally:
        store.dispose()
    seen = int(context.cursor or 0)
    if total < seen:  # the database was replaced: count from its start
        seen = 0
    need = int(cfg.rating.vote_sensor.min_new_votes)
    if total - seen < need:
        return dg.SkipReason(
            f"{total - seen} new vote(s) since the last refresh ({total} in all); waiting for {need}"
        )
    context.update_cursor(str(total))
    context.log.info("%d new arena votes: refreshing battles + leaderboard", total - seen)
    return dg.RunRequest(
        tags={"arenaflow/votes": str(total), "arenaflow/new_votes": str(total - seen)}
    )


jobs = [rating_refresh_job]
sensors = [arena_votes_sensor]
