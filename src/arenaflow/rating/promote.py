"""Eval-gated promotion: move the registry alias `champion` to the best rated local model.

The rule, in order:

1. Candidates are the competitors that have a version of `tracking.registered_model_name`:
   the competitor named "finetuned" (or with `local: finetuned`) is the `finetuned_model`
   asset's version; a competitor whose `local:` is a `models:/<name>/<version>` or
   `models:/<name>@<alias>` URI of that registered model is the version it resolves to.
   The candidate is the one with the highest Bradley–Terry rating on the leaderboard (the
   `rating.promote_on` board: judge, human or combined battles).
2. No current champion (alias unset): the candidate is promoted.
3. The candidate already is the champion: nothing moves.
4. The bar is the current champion's lower CI bound. When the champion is a competitor of this
   run (e.g. `local: models:/arenaflow-chat@champion`), the bound comes from this leaderboard.
   Otherwise it comes from the `arenaflow.rating_ci_lower` tag written on the champion's version
   when it was last rated, and only if that rating was on the same scale as this run's (tag
   `arenaflow.rating_scale`: same anchor model and rating, judge and benchmark; unanchored ratings
   never compare across runs). Without a comparable bound the alias stays, and the reason says how
   to make the runs comparable.
5. The candidate is promoted when its rating is not below the bar.

Every rated candidate version gets its rating tags and its lineage (data hash -> training run ->
answers -> judgments -> rating) as version tags, promoted or not, so a later run can compare to it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.tracking import ModelVersionInfo, Tracker, parse_models_uri, tracker_from_cfg

log = logging.getLogger(__name__)

TAG_RATING = "arenaflow.rating"
TAG_CI_LOWER = "arenaflow.rating_ci_lower"
TAG_CI_UPPER = "arenaflow.rating_ci_upper"
TAG_SCALE = "arenaflow.rating_scale"


@dataclass
class Decision:
    """What happened to the alias and why; `bar` is the rating the candidate had to reach."""

    promoted: bool
    reason: str
    candidate: str | None = None
    version: str | None = None
    rating: float | None = None
    champion_version: str | None = None
    bar: float | None = None
    bar_source: str | None = None


def competitor_versions(
    cfg: DictConfig, tracker: Tracker, finetuned: dict[str, Any] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Registry version of each competitor that has one, and why the others have none."""
    name = str(cfg.tracking.registered_model_name)
    versions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for comp in cfg.eval.competitors:
        local = comp.get("local")
        if comp.name == "finetuned" or local == "finetuned":
            if finetuned and finetuned.get("model_uri") and finetuned.get("version"):
                versions[comp.name] = str(finetuned["version"])
            else:
                skipped[comp.name] = "the finetuned model was not registered (train.register)"
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


def decide(
    rows: list[dict[str, Any]],
    versions: dict[str, str],
    champion: ModelVersionInfo | None,
    scale: str,
) -> Decision:
    """Apply the promotion rule (module docstring) to a leaderboard; touches nothing."""
    rated = [r for r in rows if r["model"] in versions]
    if not rated:
        return Decision(False, "no competitor on the leaderboard has a registry version")
    best = max(rated, key=lambda r: r["rating"])
    d = Decision(False, "", best["model"], versions[best["model"]], float(best["rating"]))
    if champion is None:
        d.promoted, d.reason = True, "no current champion"
        return d
    d.champion_version = champion.version
    if champion.version == d.version:
        d.reason = f"version {d.version} already is the champion"
        return d
    in_run = [r for r in rows if versions.get(r["model"]) == champion.version]
    if in_run:
        d.bar, d.bar_source = float(in_run[0]["ci_lower"]), f"this run ({in_run[0]['model']})"
    elif champion.tags.get(TAG_SCALE) == scale and scale != "unanchored":
        d.bar, d.bar_source = float(champion.tags[TAG_CI_LOWER]), "champion's version tags"
    else:
        d.reason = (
            f"champion version {champion.version} is not a competitor of this run and its "
            f"recorded rating scale ({champion.tags.get(TAG_SCALE, 'none')!r}) differs from this "
            f"run's ({scale!r}); add a competitor with local: models:/{champion.name}@champion, "
            "or keep the same rating.anchor, judge and benchmark"
        )
        return d
    if d.rating >= d.bar:
        d.promoted = True
        d.reason = (
            f"{d.candidate} (v{d.version}) rates {d.rating:.1f} >= champion v{champion.version}'s "
            f"lower CI bound {d.bar:.1f} ({d.bar_source})"
        )
    else:
        d.reason = (
            f"{d.candidate} (v{d.version}) rates {d.rating:.1f} < champion v{champion.version}'s "
            f"lower CI bound {d.bar:.1f} ({d.bar_source}); the alias stays"
        )
    return d


def _lineage(
    cfg: DictConfig,
    competitor: str,
    info: ModelVersionInfo | None,
    leaderboard: dict[str, Any],
    finetuned: dict[str, Any] | None,
) -> dict[str, str]:
    tags = info.tags if info else {}
    from_finetuned = finetuned if competitor == "finetuned" and finetuned else {}
    data_hash = tags.get("data_hash") or from_finetuned.get("data_hash") or "unknown"
    training_run = (info.run_id if info else None) or from_finetuned.get("run_id") or "unknown"
    answers = io.artifact_uri(
        cfg, "mt_bench", cfg.eval.bench_name, "model_answer", f"{competitor}.jsonl"
    )
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


def promote_champion(
    cfg: DictConfig, leaderboard: dict[str, Any], finetuned: dict[str, Any] | None
) -> dict[str, Any]:
    """Tag every rated candidate version, then move the champion alias if the rule says so."""
    tracker = tracker_from_cfg(cfg)
    name = str(cfg.tracking.registered_model_name)
    alias = str(cfg.rating.champion_alias)
    versions, skipped = competitor_versions(cfg, tracker, finetuned)
    champion = tracker.get_version(name, alias=alias)
    rows = leaderboard["rows"]
    scale = leaderboard["scale"]
    decision = decide(rows, versions, champion, scale)
    by_model = {r["model"]: r for r in rows}
    tagged = {}
    for competitor, version in versions.items():
        row = by_model.get(competitor)
        if row is None:
            skipped[competitor] = "no battles on the leaderboard"
            continue
        info = tracker.get_version(name, version=version)
        tags = {
            TAG_RATING: f"{row['rating']:.2f}",
            TAG_CI_LOWER: f"{row['ci_lower']:.2f}",
            TAG_CI_UPPER: f"{row['ci_upper']:.2f}",
            TAG_SCALE: scale,
            "arenaflow.rating_rank": row["rank"],
            "arenaflow.mt_bench_score": "none"
            if row["mt_bench"] is None
            else f"{row['mt_bench']:.3f}",
            **_lineage(cfg, competitor, info, leaderboard, finetuned),
        }
        if leaderboard.get("rating_on"):
            tags["arenaflow.rating_on"] = leaderboard["rating_on"]
        for view in ("judge", "human", "combined"):
            if row.get(f"{view}_rating") is not None:
                tags[f"arenaflow.rating_{view}"] = f"{row[f'{view}_rating']:.2f}"
        tracker.set_version_tags(name, version, tags)
        tagged[competitor] = version
    if decision.promoted and not cfg.rating.promote:
        decision.promoted = False
        decision.reason = f"would promote ({decision.reason}), but rating.promote=false"
    if decision.promoted:
        tracker.set_alias(name, alias, decision.version)
        tracker.set_version_tags(
            name,
            decision.version,
            {
                "arenaflow.promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "arenaflow.promoted_over": decision.champion_version or "none",
            },
        )
    log.info("champion: %s", decision.reason)
    current = tracker.get_version(name, alias=alias)
    result = {
        "model_uri": f"models:/{name}@{alias}" if current else None,
        "version": current.version if current else None,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "candidate": decision.candidate,
        "candidate_version": decision.version,
        "candidate_rating": decision.rating,
        "bar": decision.bar,
        "bar_source": decision.bar_source,
        "previous_champion": decision.champion_version,
        "registered_name": name,
        "competitor_versions": versions,
        "not_candidates": skipped,
        "tagged": tagged,
        "scale": scale,
    }
    with tracker.start_run("champion", cfg) as run:
        run.set_tags({"arenaflow.promoted": decision.promoted, "arenaflow.reason": decision.reason})
        run.log_metrics({"promoted": float(decision.promoted)})
        run.log_dict(result, "champion.json")
        result["run_id"], result["run_url"] = run.run_id, run.url
    return result
