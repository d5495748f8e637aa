"""Dagster assets of the rating group: battles, the leaderboard, and the eval-gated `champion`
alias. Each calls one step of `arenaflow.rating`, the library `python -m arenaflow.rating` runs."""

from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.rating import build_battles, build_leaderboard, promote_champion
from pipelines.metadata import md_table, mlflow_link, png_md
from pipelines.resources import HydraConfigResource, StageConfig, stage_config

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "rating"}
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
]


def _png(uri: str) -> bytes:
    fs, path = io.fs_for(uri)
    with fs.open(path, "rb") as f:
        return f.read()


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version="1",
    kinds={"python"},
    description="Battles (FastChat columns) from pairwise judgments by the swap rule, plus external battle files.",
)
def battles(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    mt_bench_judgments: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Battles (FastChat columns) from pairwise judgments by the swap rule, plus external battle files."""
    cfg, meta = stage_config(context, hydra, config)
    out = build_battles(cfg, mt_bench_judgments)
    invalid_rows = [
        {"source": src, "reason": reason, "count": n}
        for src, reasons in out["invalid"].items()
        for reason, n in sorted(reasons.items())
    ]
    return dg.Output(
        value={k: out[k] for k in ("uri", "count", "models", "pair_uri", "judge_model")},
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(out["uri"]),
            "count": out["count"],
            "models": dg.MetadataValue.json(out["models"]),
            "by_source": dg.MetadataValue.md(
                md_table([{"source": s, "battles": n} for s, n in out["by_source"].items()])
            ),
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
    code_version="1",
    kinds={"python", "mlflow"},
    description="Leaderboard: Bradley–Terry rating with bootstrap CI, online Elo, CI-aware rank, MT-bench score, win rate.",
)
def leaderboard(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    battles: dict[str, Any],
    mt_bench_scores: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Leaderboard: Bradley–Terry rating with bootstrap CI, online Elo, CI-aware rank, MT-bench score, win rate."""
    cfg, meta = stage_config(context, hydra, config)
    out = build_leaderboard(cfg, battles, mt_bench_scores)
    report = io.read_json(out["uri"])
    matrix_rows = [{"model": m, **row} for m, row in report["predicted_win_rate"].items()]
    top = out["rows"][0]
    return dg.Output(
        value={
            k: out[k]
            for k in ("uri", "rows", "scale", "battles_uri", "pair_uri", "judge_model", "run_id")
        },
        metadata={
            **meta,
            "uri": dg.MetadataValue.path(out["uri"]),
            "leaderboard": dg.MetadataValue.md(md_table(out["rows"], LEADERBOARD_COLUMNS)),
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


@dg.asset(
    group_name="rating",
    owners=OWNERS,
    tags=TAGS,
    code_version="1",
    kinds={"mlflow"},
    description="Moves the registry alias `champion` to the best rated local model unless it rates below the champion's lower CI bound.",
)
def champion_model(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    leaderboard: dict[str, Any],
    finetuned_model: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """Moves the registry alias `champion` to the best rated local model unless it rates below
    the champion's lower CI bound (rule: arenaflow.rating.promote)."""
    cfg, meta = stage_config(context, hydra, config)
    out = promote_champion(cfg, leaderboard, finetuned_model)
    context.log.info("champion: %s", out["reason"])
    decision = [
        {"field": k, "value": out[k]}
        for k in (
            "promoted",
            "candidate",
            "candidate_version",
            "candidate_rating",
            "previous_champion",
            "bar",
            "bar_source",
            "version",
        )
    ]
    return dg.Output(
        value={
            k: out[k]
            for k in ("model_uri", "version", "promoted", "reason", "candidate_version", "run_id")
        },
        metadata={
            **meta,
            "promoted": out["promoted"],
            "reason": dg.MetadataValue.md(out["reason"]),
            "model_uri": str(out["model_uri"]),
            "champion_version": str(out["version"]),
            "decision": dg.MetadataValue.md(md_table(decision)),
            "rule": dg.MetadataValue.md(
                "Promote the best rated competitor with a registry version unless its rating is "
                "below the champion's lower CI bound: from this leaderboard when the champion is a "
                "competitor, else from the rating tags on the champion's version when they were "
                f"rated on the same scale (this run: `{out['scale']}`); otherwise the alias stays."
            ),
            "competitor_versions": dg.MetadataValue.json(out["competitor_versions"]),
            "not_candidates": dg.MetadataValue.json(out["not_candidates"]),
            **mlflow_link(out.get("run_url")),
        },
    )
