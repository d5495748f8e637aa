"""`make run`: materialize the whole asset graph in the persistent Dagster instance, then report.

Usage: python -m pipelines.run experiment=demo [more Hydra overrides]

Assets run in dependency order; a partitioned asset (mt_bench_answers) runs one partition per
competitor. An asset whose code version, resolved config (the sections its stage can read) and
upstream fingerprints are unchanged since its last successful materialization is reused, so a
second `make run` is fast and `serve.*` overrides do not retrain. Everything
lands in $DAGSTER_HOME (the same instance `make dev` shows) and in the project's MLflow store.

Why a fingerprint tag and not Dagster's stale status: Dagster versions code and upstream data but
not run config, so the config hash would have to be folded into every asset's code version, and
its stale-status resolver is reachable only through private modules (`dagster._core...`); a
prototype doing both passed the driver tests, but would tie `make run` to Dagster internals.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import dagster as dg

from arenaflow.config import compose_config, config_hash
from arenaflow.redact import redact_overrides
from pipelines.assets.serve import curl_example
from pipelines.definitions import build_definitions
from pipelines.resources import HydraConfigResource

FINGERPRINT_TAG = "arenaflow/fingerprint"
CALIBRATION_FIGURES = (
    "single_separation",
    "pairwise_accuracy",
    "swap_consistency",
    "tie_rate",
    "parse_failure_rate",
)
ALWAYS_RUN = {"serving_deployment"}  # a deployment is a live process: always check/roll it
# Top-level config sections that no asset of a group reads (they belong to later stages or to
# the terminal chat); every other section, resolved, is part of the group's fingerprint. Groups
# not listed here hash the whole config.
UNUSED_SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("chat", "serve", "rating", "judge", "evaluate"),
    "train": ("chat", "serve", "rating", "judge", "evaluate"),
    "evaluate": ("chat", "serve", "rating", "train", "judge"),
    "judge": ("chat", "serve", "rating", "train", "data"),
    "rating": ("chat", "train", "data"),  # serve stays: the vote store is serve.arena.db_url
    "serve": ("chat", "train", "judge", "rating"),
}


def group_config_hash(cfg: Any, group: str | None) -> str:
    """Hash of the resolved config sections an asset of `group` can depend on."""
    unused = UNUSED_SECTIONS.get(group or "", ())
    return config_hash(cfg, *[k for k in cfg if k not in unused])


def toposort(
    assets: Sequence[dg.AssetsDefinition],
) -> list[tuple[dg.AssetKey, dg.AssetsDefinition]]:
    by_key = {k: a for a in assets for k in a.keys}
    order: list[dg.AssetKey] = []
    seen: set[dg.AssetKey] = set()

    def visit(key: dg.AssetKey) -> None:
        if key in seen or key not in by_key:
            return
        seen.add(key)
        for dep in sorted(by_key[key].asset_deps.get(key, ()), key=str):
            visit(dep)
        order.append(key)

    for key in sorted(by_key, key=str):
        visit(key)
    return [(k, by_key[k]) for k in order]


def fingerprint(
    key: dg.AssetKey, asset: dg.AssetsDefinition, cfg_hash: str, upstream: list[str]
) -> str:
    code = asset.code_versions_by_key.get(key) or ""
    payload = "|".join([key.to_user_string(), code, cfg_hash, *sorted(upstream)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def last_fingerprint(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None
) -> str | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records:
        return None
    run = instance.get_run_by_id(records[0].run_id)
    return run.tags.get(f"{FINGERPRINT_TAG}/{key.to_user_string()}") if run else None


def materialize_all(overrides: list[str], instance: dg.DagsterInstance) -> dict[str, Any]:
    defs = build_definitions()
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    resources = {"hydra": HydraConfigResource(overrides=overrides)}
    cfg = compose_config(overrides)
    fps: dict[dg.AssetKey, str] = {}
    timings: dict[str, str] = {}
    for key, asset in toposort(assets):
        upstream = [fps[d] for d in asset.asset_deps.get(key, ()) if d in fps]
        cfg_hash = group_config_hash(cfg, asset.group_names_by_key.get(key))
        fps[key] = fp = fingerprint(key, asset, cfg_hash, upstream)
        partitions = asset.partitions_def.get_partition_keys() if asset.partitions_def else [None]
        name = key.to_user_string()
        for pk in partitions:
            label = f"{name}[{pk}]" if pk else name
            if name not in ALWAYS_RUN and last_fingerprint(instance, key, pk) == fp:
                print(f"== {label}: up to date, reused", flush=True)
                timings[label] = "reused"
                continue
            print(f"== {label}: materializing", flush=True)
            t0 = time.perf_counter()
            dg.materialize(
                assets,
                selection=[key],
                instance=instance,
                resources=resources,
                partition_key=pk,
                tags={
                    f"{FINGERPRINT_TAG}/{name}": fp,
                    "arenaflow/overrides": " ".join(redact_overrides(overrides)),
                },
            )
            timings[label] = f"{time.perf_counter() - t0:.1f}s"
    return {"defs": defs, "timings": timings}


def _value(
    defs: dg.Definitions, instance: dg.DagsterInstance, key: str, partition: str | None = None
) -> Any:
    try:
        return defs.load_asset_value(key, instance=instance, partition_key=partition)
    except Exception:  # noqa: BLE001 - an asset the graph does not have yet
        return None


def report(
    defs: dg.Definitions, instance: dg.DagsterInstance, timings: dict[str, str], seconds: float
) -> str:
    """The text `make run` prints: timings, then what each stage produced, then where to look."""

    def value(key: str) -> dict[str, Any]:
        return _value(defs, instance, key) or {}

    lines = ["", "=" * 72, "arenaflow — run report", "=" * 72]
    lines += [f"  {k:<36} {v}" for k, v in timings.items()]
    lines += _data_lines(value("sharegpt_clean"), value("sft_dataset").get("counts") or {})
    lines += _training_lines(value("finetuned_model"))
    lines += _scores_lines(value("mt_bench_scores").get("scores") or {})
    lines += _leaderboard_lines(value("leaderboard"))
    lines += _champion_lines(value("champion_model"))
    lines += _endpoint_lines(value("serving_deployment"))
    lines += [
        "",
        "Dagster UI: make dev     (http://127.0.0.1:3000, the same instance)",
        "MLflow UI:  make mlflow  (http://127.0.0.1:5000)",
        f"total: {seconds:.0f}s",
        "",
    ]
    return "\n".join(lines)


def _data_lines(clean: dict[str, Any], sft: dict[str, Any]) -> list[str]:
    lines = []
    if clean:
        dropped = clean.get("dropped") or {}
        lines += [
            "",
            f"data: {clean.get('input')} conversations in, {clean.get('kept')} kept, "
            f"{sum(dropped.values())} dropped{_reasons(dropped)}",
        ]
    if sft:
        lines.append(
            f"sft dataset: {sft.get('examples')} examples (train {sft.get('train')}, validation "
            f"{sft.get('validation')}) from {sft.get('kept')} conversations"
            f"{_reasons(sft.get('dropped') or {}, 'not used')}"
        )
    return lines


def _training_lines(ft: dict[str, Any]) -> list[str]:
    if not ft:
        return []
    loss = ft.get("final_loss")
    loss = f"{loss:.4f}" if isinstance(loss, int | float) else "-"
    return [f"training: final loss {loss}, model {ft.get('model_uri') or ft.get('path')}"]


def _scores_lines(scores: dict[str, Any]) -> list[str]:
    if not scores:
        return []
    rows = [
        [m, *(_f(s.get(k)) for k in ("turn1", "turn2", "average", "expected"))]
        for m, s in scores.items()
    ]
    return ["", "MT-bench (judge scores 1-10):"] + _table(
        rows, ["model", "turn 1", "turn 2", "avg", "expected"]
    )


def _leaderboard_lines(lb: dict[str, Any]) -> list[str]:
    board = lb.get("rows") or []
    calibration = lb.get("judge_calibration") or {}
    lines = []
    if calibration:
        mark = "passed" if calibration.get("passed") else "FAILED"
        lines += ["", f"judge calibration: {mark}: {calibration.get('summary')}"]
        figures = calibration.get("figures") or {}
        lines.append("  " + ", ".join(f"{k} {_f(figures.get(k))}" for k in CALIBRATION_FIGURES))
    if not board:
        return lines
    outcomes = str(lb.get("outcomes") or "hard").split(":")[0]
    style = lb.get("style") or {}
    styled = bool(style.get("on"))
    lines += [
        "",
        f"leaderboard ({'style-controlled ' if styled else ''}Bradley-Terry on {outcomes} "
        "outcomes, 95% bootstrap CI; W/T/L in judged battles):",
    ]
    if styled:
        coefs = ", ".join(
            f"{f} {c['value']:+.2f}" for f, c in (style.get("coefficients") or {}).items()
        )
        lines.append(
            f"  (the champion is decided on this rating; raw = without style control; "
            f"style coefficients: {coefs or 'none varied'})"
        )
    elif style.get("note"):
        lines.append(f"  (style control: {style['note']})")
    if calibration and not calibration.get("passed"):
        lines.append("  (uncalibrated judge: these ratings cannot move the champion)")
    return lines + _board_table(board, styled)


def _board_table(board: list[dict[str, Any]], styled: bool) -> list[str]:
    human = any(r.get("human_battles") for r in board)
    rows = []
    for r in board:
        row = [
            str(r.get("rank")),
            str(r.get("model")),
            _f(r.get("rating"), 1),
            f"[{_f(r.get('ci_lower'), 1)}, {_f(r.get('ci_upper'), 1)}]",
            _f(r.get("mt_bench")),
            f"{r.get('wins', 0)}/{r.get('ties', 0)}/{r.get('losses', 0)}",
        ]
        if styled:
            row.insert(4, _f(r.get("raw_rating"), 1))
        if human:
            row.append(_f(r.get("human_rating"), 1))
        rows.append(row)
    head = ["rank", "model", "rating", "CI", *(["raw"] if styled else []), "MT-bench", "W/T/L"]
    return _table(rows, head + (["human"] if human else []), left=2)


def _champion_lines(champ: dict[str, Any]) -> list[str]:
    if not champ:
        return []
    served = f"v{champ.get('version')} ({champ.get('served_role')})"
    return [
        "",
        f"champion: {champ.get('model_uri')} = {served}, {champ.get('outcome')}",
        f"  {champ.get('reason')}",
    ]


def _endpoint_lines(dep: dict[str, Any]) -> list[str]:
    if not dep.get("url"):
        return []
    url = dep["url"].rstrip("/")
    lines = [
        "",
        f"endpoint: {url}  (pid {dep.get('pid')}, {dep.get('model_uri')})",
        "  " + curl_example(url, dep.get("model_name", "arenaflow-chat")),
    ]
    served = dep.get("models") or []
    if len(served) > 1:
        names = [f"{m['id']} (= {m['alias_of']})" if m.get("alias_of") else m["id"] for m in served]
        arena = url.removesuffix("/v1") + "/arena"
        lines.append(f"  serves {', '.join(names)}; side-by-side battles at {arena}")
    return lines


def _f(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else "-"


def _reasons(counts: dict[str, int], what: str = "") -> str:
    """` (reason n, ...)` by count, largest first; empty when nothing was dropped."""
    if not counts:
        return ""
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f" ({what + ': ' if what else ''}{parts})"


def _table(rows: list[list[str]], head: list[str], left: int = 1) -> list[str]:
    """Aligned text columns: the first `left` left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return (
            "  "
            + "  ".join(
                f"{c:<{w}}" if i < left else f"{c:>{w}}"
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )

    return [line(head), *(line(r) for r in rows)]


def main(argv: Sequence[str]) -> int:
    overrides = list(argv) or ["experiment=demo"]
    t0 = time.perf_counter()
    instance = dg.DagsterInstance.get()
    out = materialize_all(overrides, instance)
    print(report(out["defs"], instance, out["timings"], time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
