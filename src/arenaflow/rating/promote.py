"""Eval-gated promotion: the registry alias `champion` names the best model the evidence supports.

The rule, in order:

1. The base model is a registered version (tag `arenaflow.role=base`, written by the base_model
   asset) and the first incumbent: with no champion yet, the alias is set to the base version.
2. Candidates are the competitors with a version of `tracking.registered_model_name`: `finetuned`
   (the finetuned_model asset's version), `base` (the base_model asset's) and any `local:`
   `models:/<name>/<version>` or `models:/<name>@<alias>` URI of that registered model.
3. The challenger is the best rated candidate (on the `rating.promote_on` board) that is not the
   incumbent; without one, nothing moves.
4. When the incumbent is a competitor of this run, the comparison is paired: over the bootstrap
   rounds that give the CIs, rating(challenger) - rating(incumbent); the challenger wins when the
   lower end of its central `rating.ci_level` interval is above `rating.promote_margin`.
5. Otherwise the incumbent's rating comes from the tags written on its version when it was last
   rated, and only on the same scale (anchor, judge and benchmark; unanchored ratings never
   compare across runs): two unpaired intervals, so the challenger's lower CI bound must clear the
   incumbent's recorded upper bound plus the margin. Without a comparable rating nothing moves,
   and the reason says how to compare (the champion as a competitor: a paired test).
6. A judge that failed calibration cannot move the champion when its battles are on the board.

Every rated candidate version gets its rating tags, the comparison with the champion and its
lineage (data hash -> training run -> answers -> judgments -> rating) as version tags, promoted or
not, so a later run can compare to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.rating.ratings import TIE_EPS
from arenaflow.tracking import ModelVersionInfo, Tracker, parse_models_uri, tracker_from_cfg

log = logging.getLogger(__name__)

TAG_RATING = "arenaflow.rating"
TAG_CI_LOWER = "arenaflow.rating_ci_lower"
TAG_CI_UPPER = "arenaflow.rating_ci_upper"
TAG_SCALE = "arenaflow.rating_scale"
TAG_ROLE = "arenaflow.role"


@dataclass
class Decision:
    """What happened to the alias and why, with the comparison that decided it."""

    promoted: bool
    outcome: str  # promoted | kept | no_decision
    reason: str
    challenger: str | None = None
    challenger_version: str | None = None
    challenger_rating: float | None = None
    incumbent: str | None = None  # the incumbent's competitor name in this run, if it is one
    incumbent_version: str | None = None
    incumbent_rating: float | None = None
    diff: float | None = None  # rating(challenger) - rating(incumbent)
    diff_lower: float | None = None
    diff_upper: float | None = None
    p_better: float | None = None  # P(challenger > incumbent) over the bootstrap rounds
    comparison: str | None = None  # how the two were compared


def competitor_versions(
    name: str,
    competitors: Iterable[Any],
    tracker: Tracker,
    finetuned: dict[str, Any] | None,
    base: dict[str, Any] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Registry version (of registered model `name`) of each competitor (`evaluate.competitors`) that
    has one, and why the others have none."""
    versions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    assets = {"finetuned": (finetuned, "train.register"), "base": (base, "tracking.enabled")}
    for comp in competitors:
        local = comp.get("local")
        role = local if local in assets else (comp.name if comp.name in assets else None)
        if role is not None and (local is None or local == role):
            value, switch = assets[role]
            if value and value.get("version"):
                versions[comp.name] = str(value["version"])
            else:
                skipped[comp.name] = f"the {role} model was not registered ({switch})"
        elif isinstance(local, str) and local.startswith("models:/"):
            reg, version, alias = parse_models_uri(local)
            if reg != name:
                skipped[comp.name] = f"{local} is not a version of {name!r}"
                continue
            info = tracker.get_version(reg, alias=alias, version=version)
            if info is None:
                skipped[comp.name] = f"{local} is not in the registry"
            else:
                versions[comp.name] = info.version
        else:
            skipped[comp.name] = "not a registered model"
    return versions, skipped


def _interval(d: Decision, level: float) -> str:
    p = "" if d.p_better is None else f", P(better) {d.p_better:.2f}"
    return f"{d.diff:+.1f} [{d.diff_lower:+.1f}, {d.diff_upper:+.1f}] at {level:.0%}{p}"


def decide(
    rows: list[dict[str, Any]],
    paired: dict[str, dict[str, dict[str, float]]],
    versions: dict[str, str],
    incumbent: ModelVersionInfo | None,
    scale: str,
    *,
    margin: float = 0.0,
    level: float = 0.95,
    judge_failure: str | None = None,
) -> Decision:
    """Apply the promotion rule (module docstring) to a leaderboard; touches nothing."""
    if incumbent is None:
        return Decision(
            False,
            "no_decision",
            "no champion and no registered base model to start from; register the base "
            "(tracking enabled, materialize base_model) so it is the first incumbent",
        )
    by_model = {r["model"]: r for r in rows}
    rated = [r for r in rows if r["model"] in versions]
    in_run = [m for m, v in versions.items() if v == incumbent.version and m in by_model]
    inc_name = in_run[0] if in_run else None
    challengers = [r for r in rated if versions[r["model"]] != incumbent.version]
    d = Decision(False, "kept", "", incumbent=inc_name, incumbent_version=incumbent.version)
    champ = f"champion v{incumbent.version}" + (f" ({inc_name})" if inc_name else "")
    if not challengers:
        d.reason = f"{champ} stays: no other rated competitor has a registry version"
        return d
    best = max(challengers, key=lambda r: r["rating"])
    d.challenger, d.challenger_version = best["model"], versions[best["model"]]
    d.challenger_rating = float(best["rating"])
    who = f"{d.challenger} (v{d.challenger_version})"
    if inc_name is not None:
        pair = paired[d.challenger][inc_name]
        d.incumbent_rating = float(by_model[inc_name]["rating"])
        d.diff, d.diff_lower, d.diff_upper = pair["diff"], pair["lower"], pair["upper"]
        d.p_better, d.comparison = pair["p_better"], "paired bootstrap on this run's battles"
    elif incumbent.tags.get(TAG_SCALE) == scale and scale != "unanchored":
        tags = incumbent.tags
        d.incumbent_rating = float(tags[TAG_RATING])
        d.diff = d.challenger_rating - d.incumbent_rating
        d.diff_lower = float(best["ci_lower"]) - float(tags[TAG_CI_UPPER])
        d.diff_upper = float(best["ci_upper"]) - float(tags[TAG_CI_LOWER])
        d.comparison = "this run's CI against the champion's version tags (same scale, unpaired)"
    else:
        d.outcome = "no_decision"
        d.reason = (
            f"{champ} stays: it is not a competitor of this run and its recorded rating scale "
            f"({incumbent.tags.get(TAG_SCALE, 'none')!r}) differs from this run's ({scale!r}); "
            f"add a competitor with local: models:/{incumbent.name}@champion (a paired test), "
            "or keep the same rating.anchor, judge and benchmark"
        )
        return d
    versus = f"{who} vs {champ}: {_interval(d, level)} ({d.comparison})"
    if judge_failure:
        d.reason = f"{champ} stays: {judge_failure}. {versus}"
    elif d.diff_lower > margin + TIE_EPS:  # a bound within rounding of the margin is not above it
        d.promoted, d.outcome = True, "promoted"
        d.reason = f"promoted {who} over {champ}: {_interval(d, level)} ({d.comparison})"
    else:
        d.reason = (
            f"{champ} stays: {who} is not significantly better, the lower bound "
            f"{d.diff_lower:+.1f} is not above rating.promote_margin={margin:g}. {versus}"
        )
    return d


def _lineage(
    answers_dir: str,
    competitor: str,
    info: ModelVersionInfo | None,
    leaderboard: dict[str, Any],
    finetuned: dict[str, Any] | None,
) -> dict[str, str]:
    tags = info.tags if info else {}
    from_finetuned = finetuned if competitor == "finetuned" and finetuned else {}
    data_hash = tags.get("data_hash") or from_finetuned.get("data_hash") or "unknown"
    training_run = (info.run_id if info else None) or from_finetuned.get("run_id") or "unknown"
    answers = io.join(answers_dir, f"{competitor}.jsonl")
    judgments = leaderboard.get("pair_uri") or "none"
    rating = leaderboard.get("run_id") or leaderboard["uri"]
    return {
        "arenaflow.lineage.data_hash": data_hash,
        "arenaflow.lineage.training_run": training_run,
        "arenaflow.lineage.answers": answers,
        "arenaflow.lineage.judgments": judgments,
        "arenaflow.lineage.rating": rating,
        "arenaflow.lineage": (
            f"data {data_hash} -> train run {training_run} -> answers {answers} -> "
            f"judgments {judgments} -> rating {rating}"
        ),
    }


def promotion_rule(margin: float, scale: str) -> str:
    """The rule above in one paragraph, with this run's margin and rating scale."""
    return (
        "The base model is the first champion. The best rated registered challenger "
        "replaces the champion only when the lower end of the paired bootstrap interval "
        f"of rating(challenger) - rating(champion) is above {margin:g} "
        "(`rating.promote_margin`), and only if the judge passed calibration; a champion "
        "that is not a competitor is compared through its version tags on the same scale "
        f"(this run: `{scale}`)."
    )


def judge_failure(leaderboard: dict[str, Any]) -> str | None:
    """Why the judge's battles cannot move the champion, or None (calibrated, or not on the board)."""
    calibration = leaderboard.get("judge_calibration") or {}
    on_board = leaderboard.get("rating_on") in ("judge", "combined")
    judge_battles = (leaderboard.get("battles_by_source") or {}).get("judge", 1)
    if not on_board or not judge_battles or calibration.get("passed"):
        return None
    return str(calibration.get("summary") or "the judge was not calibrated")


def _seed_base(
    tracker: Tracker, name: str, alias: str, base: dict[str, Any] | None
) -> ModelVersionInfo | None:
    """With no champion yet, the base version becomes the first incumbent."""
    if not (base and base.get("version")):
        return None
    tracker.set_alias(name, alias, str(base["version"]))
    tracker.set_version_tags(name, str(base["version"]), _promoted_tags(None))
    log.info(
        "champion: no champion yet, the base model (v%s) is the first incumbent", base["version"]
    )
    return tracker.get_version(name, alias=alias)


def _comparison_tags(d: Decision) -> dict[str, str]:
    tags = {"arenaflow.decision": d.outcome, "arenaflow.compared_with": f"v{d.incumbent_version}"}
    for key in ("diff", "diff_lower", "diff_upper", "p_better"):
        value = getattr(d, key)
        if value is not None:
            tags[f"arenaflow.vs_champion_{key}"] = f"{value:.3f}"
    return tags


def _promoted_tags(over: str | None) -> dict[str, str]:
    return {
        "arenaflow.promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "arenaflow.promoted_over": over or "none",
    }


def rating_tags(row: dict[str, Any], scale: str, rating_on: str | None) -> dict[str, Any]:
    """A rated version's rating tags: what a later run compares its champion with."""
    tags = {
        TAG_RATING: f"{row['rating']:.2f}",
        TAG_CI_LOWER: f"{row['ci_lower']:.2f}",
        TAG_CI_UPPER: f"{row['ci_upper']:.2f}",
        TAG_SCALE: scale,
        "arenaflow.rating_rank": row["rank"],
        "arenaflow.mt_bench_score": "none" if row["mt_bench"] is None else f"{row['mt_bench']:.3f}",
    }
    if rating_on:
        tags["arenaflow.rating_on"] = rating_on
    for view in ("judge", "human", "combined"):
        if row.get(f"{view}_rating") is not None:
            tags[f"arenaflow.rating_{view}"] = f"{row[f'{view}_rating']:.2f}"
    return tags


def tag_candidates(
    tracker: Tracker,
    name: str,
    versions: dict[str, str],
    leaderboard: dict[str, Any],
    decision: Decision,
    lineage: Callable[[str, ModelVersionInfo | None], dict[str, str]],
    skipped: dict[str, str],
) -> dict[str, str]:
    """Tag every rated candidate version (rating, lineage, the comparison for the challenger);
    a candidate without battles goes into `skipped`."""
    by_model = {r["model"]: r for r in leaderboard["rows"]}
    tagged = {}
    for competitor, version in versions.items():
        row = by_model.get(competitor)
        if row is None:
            skipped[competitor] = "no battles on the leaderboard"
            continue
        info = tracker.get_version(name, version=version)
        tags = rating_tags(row, leaderboard["scale"], leaderboard.get("rating_on"))
        tags = {**tags, **lineage(competitor, info)}
        if competitor == decision.challenger:
            tags.update(_comparison_tags(decision))
        tracker.set_version_tags(name, version, tags)
        tagged[competitor] = version
    return tagged


def _log_champion(run: Any, decision: Decision, result: dict[str, Any]) -> None:
    run.set_tags(
        {
            "arenaflow.promoted": decision.promoted,
            "arenaflow.outcome": decision.outcome,
            "arenaflow.reason": decision.reason[:4000],
        }
    )
    metrics = {"promoted": float(decision.promoted)}
    for key in ("diff", "diff_lower", "diff_upper", "p_better"):
        if result[key] is not None:
            metrics[f"vs_champion_{key}"] = float(result[key])
    run.log_metrics(metrics)
    run.log_dict(result, "champion.json")


def promote_champion(
    cfg: DictConfig,
    leaderboard: dict[str, Any],
    finetuned: dict[str, Any] | None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tag every rated candidate version, then move the champion alias if the rule says so."""
    r = cfg.rating
    tracker = tracker_from_cfg(cfg)
    name, alias = str(cfg.tracking.registered_model_name), str(r.champion_alias)
    margin, level = float(r.promote_margin), float(r.ci_level)
    answers_dir = io.artifact_uri(cfg, "mt_bench", cfg.evaluate.bench_name, "model_answer")
    versions, skipped = competitor_versions(
        name, cfg.evaluate.competitors, tracker, finetuned, base
    )
    champion = tracker.get_version(name, alias=alias)
    seeded = None
    if champion is None and r.promote:
        champion = _seed_base(tracker, name, alias, base)
        seeded = champion.version if champion else None
    decision = decide(
        leaderboard["rows"],
        leaderboard.get("paired") or {},
        versions,
        champion,
        leaderboard["scale"],
        margin=margin,
        level=level,
        judge_failure=judge_failure(leaderboard),
    )

    def lineage(competitor: str, info: ModelVersionInfo | None) -> dict[str, str]:
        return _lineage(answers_dir, competitor, info, leaderboard, finetuned)

    tagged = tag_candidates(tracker, name, versions, leaderboard, decision, lineage, skipped)
    if decision.promoted and not r.promote:
        decision.promoted, decision.outcome = False, "kept"
        decision.reason = f"would promote ({decision.reason}), but rating.promote=false"
    if decision.promoted:
        tracker.set_alias(name, alias, decision.challenger_version)
        tracker.set_version_tags(
            name, decision.challenger_version, _promoted_tags(decision.incumbent_version)
        )
    log.info("champion: %s", decision.reason)
    current = tracker.get_version(name, alias=alias)
    result = {
        **asdict(decision),
        "model_uri": f"models:/{name}@{alias}" if current else None,
        "version": current.version if current else None,
        "served_role": (current.tags.get(TAG_ROLE) or "fine-tuned") if current else None,
        "seeded_base": seeded,
        "judge_calibration": leaderboard.get("judge_calibration"),
        "margin": margin,
        "ci_level": level,
        "registered_name": name,
        "competitor_versions": versions,
        "not_candidates": skipped,
        "tagged": tagged,
        "scale": leaderboard["scale"],
    }
    with tracker.start_run("champion", cfg) as run:
        _log_champion(run, decision, result)
        result["run_id"], result["run_url"] = run.run_id, run.url
    return result
