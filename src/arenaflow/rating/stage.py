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
from arenaflow.rating.agreement import judge_human_agreement
from arenaflow.rating.bias import judge_bias
from arenaflow.rating.plots import heatmap_figure, rating_ci_figure
from arenaflow.rating.promote import TAG_ROLE, promote_champion
from arenaflow.rating.ratings import (
    battle_count_matrix,
    bootstrap_intervals,
    ci_rank,
    compute_bootstrap_bt,
    compute_bt,
    compute_elo,
    paired_differences,
    predicted_win_rate,
    win_fraction_matrix,
)
from arenaflow.rating.style import (
    compute_bootstrap_style_bt,
    compute_style_bt,
    has_style,
    length_controlled_win_rates,
)
from arenaflow.tracking import tracker_from_cfg

log = logging.getLogger(__name__)

PLOTS = ("rating_ci", "win_fraction", "battle_count")
VIEWS = ("judge", "human", "combined")
OUTCOMES = {
    True: "soft: judged battles count as the judge's expected score where it gave probabilities",
    False: "hard: winner by the swap rule, a tie counts half",
}


def metric_name(name: str) -> str:
    """An MLflow-safe metric name (model names may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]+", "_", name).strip("_ ")


def rating_uri(cfg: DictConfig, *parts: str) -> str:
    return io.artifact_uri(cfg, "rating", *parts)


def read_human_votes(cfg: DictConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The arena's votes (FastChat battle dicts) and where they came from; none when
    `rating.human_votes` is off or the SQLite file does not exist yet (no vote was cast).
    Named-mode votes (`anony` false) count only with `rating.arena_named_votes`."""
    from arenaflow.arena import VoteStore, database_exists, safe_url, vote_db_url

    info: dict[str, Any] = {"enabled": bool(cfg.rating.human_votes), "db": None, "votes": 0}
    if not cfg.rating.human_votes:
        info["note"] = "rating.human_votes=false"
        return [], info
    url = vote_db_url(cfg)
    info["db"] = safe_url(url)
    if not database_exists(url):
        info["note"] = f"no vote database at {info['db']} yet: zero human votes"
        return [], info
    store = VoteStore(url)
    try:
        votes = store.battles()
    except Exception as e:
        raise RuntimeError(
            f"could not read the arena votes at {info['db']} ({e}); fix serve.arena.db_url "
            "or set rating.human_votes=false"
        ) from e
    finally:
        store.dispose()
    named = [v for v in votes if not v.get("anony", True)]
    info["named_votes"] = len(named)
    info["named_votes_used"] = bool(cfg.rating.get("arena_named_votes", False))
    if named and not info["named_votes_used"]:
        votes = [v for v in votes if v.get("anony", True)]
        log.info(
            "%d named-mode arena vote(s) left out of the ratings (rating.arena_named_votes=false)",
            len(named),
        )
    info["votes"] = len(votes)
    info["note"] = f"{len(votes)} vote(s) from {info['db']}" + (
        f" ({len(named)} named-mode vote(s) left out: rating.arena_named_votes=false)"
        if named and not info["named_votes_used"]
        else ""
    )
    return votes, info


def build_battles(cfg: DictConfig, judgments: dict[str, Any] | None) -> dict[str, Any]:
    """Battles from the pairwise judgments (swap rule), `rating.external_battles` and the arena's
    human votes (`rating.human_votes`), one file; each row's `source` says judge or human.

    Rows that cannot be a battle are counted per origin and reason; the stage fails only when
    nothing usable is left, naming what to fix.
    """
    invalid: dict[str, dict[str, int]] = {}
    by_origin: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    pair_uri = (judgments or {}).get("pair_uri")
    if pair_uri:
        if not io.exists(pair_uri):
            raise FileNotFoundError(
                f"pairwise judgments not found at {pair_uri}; materialize mt_bench_judgments "
                "with judge.mode including pairwise (python -m arenaflow.judge)"
            )
        counts: Counter[str] = Counter()
        records = list(bt_io.read_records(pair_uri, counts))
        styles = answer_styles(cfg, records)
        rows.extend(bt_io.battles_from_pairwise(records, counts, styles))
        by_origin["mt_bench"] = counts.pop("valid", 0)
        invalid["mt_bench"] = dict(counts)
    for uri in cfg.rating.external_battles or []:
        if not io.exists(uri):
            raise FileNotFoundError(
                f"external battle file {uri} (rating.external_battles) does not exist; "
                "fix the URI or remove it from rating.external_battles"
            )
        counts = Counter()
        rows.extend(bt_io.battles_from_records(bt_io.read_records(uri, counts), uri, counts))
        by_origin[uri] = counts.pop("valid", 0)
        invalid[uri] = dict(counts)
    votes, human = read_human_votes(cfg)
    if human["enabled"]:
        counts = Counter()
        rows.extend(bt_io.battles_from_records(votes, "arena", counts, source="human"))
        by_origin["arena"] = counts.pop("valid", 0)
        invalid["arena"] = dict(counts)
    for origin, reasons in invalid.items():
        for reason, n in reasons.items():
            log.warning("%s: %d row(s) not used as battles: %s", origin, n, reason)
    if not rows:
        raise ValueError(
            f"no valid battles (invalid rows by origin and reason: {invalid}; human votes: "
            f"{human['note']}); check the judge's pairwise output or rating.external_battles"
        )
    rows = bt_io.order_battles(rows)
    uri = rating_uri(cfg, "battles.jsonl")
    io.write_jsonl(uri, rows)
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    winners = dict(Counter(r["winner"] for r in rows))
    by_source = {s: sum(r["source"] == s for r in rows) for s in bt_io.SOURCES}
    # Human battles may name models this run did not evaluate (older champions, other servers):
    # they stay in the fit and are listed here.
    competitors = {str(c.name) for c in cfg.eval.competitors}
    outside: Counter[str] = Counter()
    with_outside = 0
    for r in rows:
        if r["source"] == "human":
            names = [m for m in (r["model_a"], r["model_b"]) if m not in competitors]
            outside.update(names)
            with_outside += bool(names)
    human["battles"] = by_source["human"]
    human["battles_with_other_models"] = with_outside
    human["not_competitors"] = dict(sorted(outside.items()))
    result = {
        "uri": uri,
        "count": len(rows),
        "models": models,
        "by_source": by_source,
        "by_origin": by_origin,
        "invalid": invalid,
        "winners": winners,
        "human_votes": human,
        "pair_uri": pair_uri,
        "judge_model": (judgments or {}).get("judge_model"),
        "judge_calibration": calibration_summary((judgments or {}).get("calibration")),
    }
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("battles", cfg) as run:
        run.log_metrics(
            {
                "battles": len(rows),
                **{metric_name(f"battles.{k}"): v for k, v in winners.items()},
                **{f"battles_{k}": v for k, v in by_source.items()},
                "human_votes": human["votes"],
                "human_battles_with_other_models": with_outside,
            }
        )
        run.log_dict(result, "battles_summary.json")
        result["run_id"], result["run_url"] = run.run_id, run.url
    return result


def answer_styles(cfg: DictConfig, judgments: list[Any]) -> bt_io.Styles:
    """The style counts of every judged model's MT-bench answers (where its answer file exists)."""
    from arenaflow.evaluate.answers import answer_uri

    models = {
        str(r[k])
        for r in judgments
        if isinstance(r, dict)
        for k in ("model_1", "model_2")
        if r.get(k)
    }
    styles: bt_io.Styles = {}
    for model in sorted(models):
        uri = answer_uri(cfg, model)
        if io.exists(uri):
            styles.update(bt_io.answer_styles(io.read_jsonl(uri), model))
    return styles


def calibration_summary(calibration: dict[str, Any] | None) -> dict[str, Any]:
    """What the rating needs of the judge's calibration: passed, the one-line summary, figures."""
    if not calibration:
        return {"passed": False, "summary": "the judge was not calibrated", "figures": {}}
    return {k: calibration.get(k) for k in ("passed", "summary", "figures")}


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


def rating_scale(
    cfg: DictConfig,
    anchor: tuple[str, float] | None,
    judge_model: str | None,
    *,
    style: bool = False,
) -> str:
    """Ratings of two runs compare only on the same scale: anchor, judge, benchmark, outcome kind
    and style control."""
    if anchor is None:
        return "unanchored"
    scale = f"anchor={anchor[0]}@{anchor[1]:g};judge={judge_model};bench={cfg.eval.bench_name}"
    scale += ";outcomes=soft" if cfg.rating.soft_outcomes else ""
    return scale + (";style=controlled" if style else "")


def _voters(df: pd.DataFrame, judge_model: str | None) -> str:
    """Who voted in a battle set, for its rating scale: the judge model, "human", or both."""
    sources = set(df["source"])
    parts = ([str(judge_model)] if "judge" in sources else []) + (
        ["human"] if "human" in sources else []
    )
    return "+".join(parts)


def fit_ratings(
    cfg: DictConfig, df: pd.DataFrame, judge_model: str | None, scores: dict[str, Any]
) -> dict[str, Any]:
    """BT rating with bootstrap CI, online Elo, CI-aware rank and win counts on one battle set."""
    r = cfg.rating
    models = sorted(set(df["model_a"]) | set(df["model_b"]))
    anchor, anchor_note = _anchor(cfg, models)
    if anchor is None and r.anchor is not None:
        log.warning(anchor_note)
    kw = {"scale": r.scale, "base": r.base, "init_rating": r.init_rating, "anchor": anchor}
    kw["soft"] = bool(r.soft_outcomes)
    point = compute_bt(df, l2=r.l2, **kw)
    boot = compute_bootstrap_bt(df, int(r.bootstrap_rounds), int(r.seed), l2=r.l2, **kw)
    ci = bootstrap_intervals(boot, float(r.ci_level))
    rank = ci_rank(ci["lower"], ci["upper"])
    style = fit_style(cfg, df, kw)
    elo = compute_elo(df, k=r.k, scale=r.scale, base=r.base, init_rating=r.init_rating)
    rows = []
    for model in point.index:
        as_a, as_b = df["model_a"] == model, df["model_b"] == model
        n = int((as_a | as_b).sum())
        wins = int(
            ((as_a & (df["winner"] == "model_a")) | (as_b & (df["winner"] == "model_b"))).sum()
        )
        ties = int(((as_a | as_b) & df["winner"].isin(["tie", "tie (bothbad)"])).sum())
        mt = scores.get(model) or {}
        row = {
            "rank": int(rank[model]),
            "model": model,
            "rating": float(point[model]),
            "ci_lower": float(ci.loc[model, "lower"]),
            "ci_upper": float(ci.loc[model, "upper"]),
        }
        if style["on"]:  # the style-controlled rating leads; the raw one stays beside it
            row = {
                **{k: row[k] for k in ("model",)},
                **{k: style["rows"][model][k] for k in ("rank", "rating", "ci_lower", "ci_upper")},
                **{f"raw_{k}": row[k] for k in ("rank", "rating", "ci_lower", "ci_upper")},
            }
        rows.append(
            {
                **row,
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
    if style["on"]:
        point, boot = style.pop("point"), style.pop("boot")
    style.pop("rows", None)
    return {
        "rows": rows,
        "point": point,
        "paired": paired_differences(boot, point, float(r.ci_level)),
        "anchor": anchor_note,
        "scale": rating_scale(cfg, anchor, _voters(df, judge_model), style=style["on"]),
        "battles": int(len(df)),
        "style": style,
    }


def fit_style(cfg: DictConfig, df: pd.DataFrame, kw: dict[str, Any]) -> dict[str, Any]:
    """The style-controlled fit of a battle set (`rating.style_control`), or why there is none.

    It needs the answers' style counts on every battle: a set where some battles lack them is
    rated raw (mixing the two would rate different battles), with the count in the note."""
    r = cfg.rating
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
    ci = bootstrap_intervals(boot, level)
    rank = ci_rank(ci["lower"], ci["upper"])
    coef_ci = bootstrap_intervals(coefs, level) if len(coefs.columns) else None
    return {
        "on": True,
        "note": f"style-controlled ({', '.join(fit.coefficients) or 'no varying feature'})",
        "battles": fit.battles,
        "coefficients": {
            f: {
                "value": v,
                "ci_lower": float(coef_ci.loc[f, "lower"]),
                "ci_upper": float(coef_ci.loc[f, "upper"]),
            }
            for f, v in fit.coefficients.items()
        },
        "rows": {
            m: {
                "rank": int(rank[m]),
                "rating": float(fit.ratings[m]),
                "ci_lower": float(ci.loc[m, "lower"]),
                "ci_upper": float(ci.loc[m, "upper"]),
            }
            for m in fit.ratings.index
        },
        "point": fit.ratings,
        "boot": boot,
    }


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
    df = pd.DataFrame(list(io.read_jsonl(battles["uri"])))
    if "source" not in df.columns:  # battles written before human votes were a source
        df["source"] = "judge"
    judge_model = battles.get("judge_model")
    score_map = (scores or {}).get("scores") or {}
    subsets = {
        "judge": df[df["source"] == "judge"],
        "human": df[df["source"] == "human"],
        "combined": df,
    }
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
            fits[view] = fit_ratings(cfg, sub, judge_model, score_map)
    main = fits[primary]
    if main is None:
        raise ValueError(
            f"rating.promote_on={primary} but there are no {primary} battles "
            f"(battles by source: {dict(Counter(df['source']))}); "
            "set rating.promote_on=combined, or collect votes first"
        )
    by_view = {
        v: {row["model"]: row for row in fit["rows"]} if fit else {} for v, fit in fits.items()
    }
    rows = []
    for row in main["rows"]:
        row = dict(row)
        for v in VIEWS:
            other = by_view[v].get(row["model"])
            for key in ("rating", "ci_lower", "ci_upper", "battles"):
                row[f"{v}_{key}"] = other[key] if other else None
        rows.append(row)
    agreement = judge_human_agreement(df.to_dict("records"))
    view_df = subsets[primary]
    baseline = str(r.get("lc_baseline") or "base")
    lc = length_controlled_win_rates(view_df, baseline, l2=r.l2, soft=bool(r.soft_outcomes))
    for row in rows:
        row["lc_win_rate"] = (lc.get(row["model"]) or {}).get("lc_win_rate")
    bias = judge_bias(
        subsets["judge"],
        fits["judge"]["style"] if fits["judge"] else None,
        judge_model,
        by_view["judge"],
        by_view["human"],
    )
    order = [row["model"] for row in rows]
    win_frac = win_fraction_matrix(view_df, order)
    counts = battle_count_matrix(view_df, order)
    predicted = predicted_win_rate(main["point"][order], r.scale, r.base)
    scale = main["scale"]
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
    ratings = {
        v: None
        if fit is None
        else {k: fit[k] for k in ("rows", "scale", "anchor", "battles", "style")}
        for v, fit in fits.items()
    }
    uri = rating_uri(cfg, "leaderboard.json")
    report = {
        "rows": rows,
        "rating_on": primary,
        "scale": scale,
        "anchor": main["anchor"],
        "ci_level": level,
        "outcomes": OUTCOMES[bool(r.soft_outcomes)],
        "bootstrap_rounds": int(r.bootstrap_rounds),
        "battles": main["battles"],
        "battles_by_source": {v: len(subsets[v]) for v in ("judge", "human")},
        "battles_uri": battles["uri"],
        "win_fraction": _matrix_json(win_frac),
        "battle_count": _matrix_json(counts),
        "predicted_win_rate": _matrix_json(predicted),
        "ratings": ratings,
        "paired": main["paired"],
        "style": main["style"],
        "lc_win_rate": {"baseline": baseline, "models": lc},
        "judge_bias": bias,
        "judge_calibration": battles.get("judge_calibration") or calibration_summary(None),
        "agreement": agreement,
    }
    io.write_json(uri, report)
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("leaderboard", cfg) as run:
        metrics = {"battles": float(main["battles"]), "models": float(len(rows))}
        for row in rows:
            for key in ("rating", "ci_lower", "ci_upper", "elo", "rank", "win_rate", "mt_bench"):
                if row[key] is not None:
                    metrics[metric_name(f"{key}.{row['model']}")] = float(row[key])
        for v, fit in fits.items():
            metrics[f"battles_{v}"] = float(len(subsets[v]))
            for row in fit["rows"] if fit else []:
                for key in ("rating", "ci_lower", "ci_upper"):
                    metrics[metric_name(f"{v}_{key}.{row['model']}")] = float(row[key])
        for feature, c in (main["style"].get("coefficients") or {}).items():
            metrics[f"style_coef_{feature}"] = float(c["value"])
        for row in rows if main["style"]["on"] else []:
            metrics[metric_name(f"raw_rating.{row['model']}")] = float(row["raw_rating"])
        for key in ("with_tie", "without_tie"):
            if agreement[key] is not None:
                metrics[f"agreement_{key}"] = float(agreement[key])
        run.log_metrics(metrics)
        run.set_tags({"arenaflow.rating_scale": scale, "arenaflow.rating_on": primary})
        run.log_table(rows, "leaderboard.json")
        if agreement["pairs"]:
            run.log_table(agreement["pairs"], "agreement.json")
        run.log_dict(report, "leaderboard_full.json")
        for name in PLOTS:
            run.log_figure(figures[name], f"plots/{name}.png")
        run_id, run_url = run.run_id, run.url
    return {
        "uri": uri,
        "rows": rows,
        "rating_on": primary,
        "scale": scale,
        "anchor": main["anchor"],
        "ratings": ratings,
        "paired": report["paired"],
        "style": report["style"],
        "lc_win_rate": report["lc_win_rate"],
        "judge_bias": bias,
        "outcomes": report["outcomes"],
        "judge_calibration": report["judge_calibration"],
        "battles_by_source": report["battles_by_source"],
        "agreement": agreement,
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Battles, leaderboard and champion from the judge stage's files in the FastChat layout.

    The finetuned competitor is the newest version of `tracking.registered_model_name` that is not
    the base, the base competitor the newest version tagged `arenaflow.role=base`; MT-bench scores
    come from the single-grading judgments and the judge's calibration from its summary file,
    when those files exist.
    """
    from arenaflow.judge.scores import single_scores
    from arenaflow.judge.stage import calibration_uris, judgment_uris

    single_uri, pair_uri = judgment_uris(cfg)
    summary_uri = calibration_uris(cfg)[1]
    judgments = {
        "pair_uri": pair_uri,
        "judge_model": str(cfg.judge.model_name),
        "calibration": io.read_json(summary_uri) if io.exists(summary_uri) else None,
    }
    battles = build_battles(cfg, judgments)
    scores = {"scores": single_scores(io.read_jsonl(single_uri))} if io.exists(single_uri) else None
    leaderboard = build_leaderboard(cfg, battles, scores)
    name = str(cfg.tracking.registered_model_name)
    versions = tracker_from_cfg(cfg).latest_versions(name)

    def newest(base: bool) -> dict[str, Any] | None:
        found = [v for v in versions if (v.tags.get(TAG_ROLE) == "base") == base]
        return (
            {"model_uri": f"models:/{name}/{found[-1].version}", "version": found[-1].version}
            if found
            else None
        )

    champion = promote_champion(cfg, leaderboard, newest(False), newest(True))
    return {
        "battles": {k: battles[k] for k in ("uri", "count", "by_source", "by_origin", "invalid")},
        "leaderboard": {"uri": leaderboard["uri"], "rows": leaderboard["rows"]},
        "champion": champion,
    }
