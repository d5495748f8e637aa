"""Eval-gated promotion against a real MLflow registry in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from arenaflow.rating import promote_champion
from arenaflow.rating.promote import decide
from arenaflow.rating.ratings import compute_bootstrap_bt, compute_bt, paired_differences
from arenaflow.tracking import ModelVersionInfo, tracker_from_cfg

NAME = "arenaflow-chat"
SCALE = "anchor=base@1000;judge=j;bench=mt_bench"
CALIBRATED = {"passed": True, "summary": "judge j passed calibration on 3 questions"}


def row(model: str, rating: float, lo: float, hi: float, rank: int = 1) -> dict:
    return {
        "model": model,
        "rating": rating,
        "ci_lower": lo,
        "ci_upper": hi,
        "rank": rank,
        "mt_bench": 5.0,
    }


def pair(diff: float, lower: float, upper: float, p: float) -> dict:
    return {"diff": diff, "lower": lower, "upper": upper, "p_better": p}


def board(*rows: dict, paired: dict | None = None, scale: str = SCALE, calibration=None) -> dict:
    return {
        "rows": list(rows),
        "paired": paired or {},
        "scale": scale,
        "rating_on": "combined",
        "battles_by_source": {"judge": 6, "human": 0},
        "judge_calibration": CALIBRATED if calibration is None else calibration,
        "uri": "mem://lb.json",
        "pair_uri": "mem://pair.jsonl",
        "run_id": "rating-run",
    }


@pytest.fixture
def registry(make_cfg, tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")

    def _make(*overrides: str):
        cfg = make_cfg(*overrides)
        tracker = tracker_from_cfg(cfg)

        def register(**tags: str) -> dict:
            with tracker.start_run("train", cfg) as run:
                info = tracker.register_model(run, ckpt, NAME, tags={"data_hash": "abc", **tags})
            return {
                "model_uri": f"models:/{NAME}/{info.version}",
                "version": info.version,
                "run_id": run.run_id,
            }

        return cfg, tracker, register

    return _make


def both(fin: dict, base: dict) -> dict:
    """Paired figures for finetuned vs base, and the mirror image."""
    mirror = pair(-fin["diff"], -fin["upper"], -fin["lower"], 1 - fin["p_better"])
    return {"finetuned": {"base": fin}, "base": {"finetuned": mirror}} | base


def test_the_base_is_the_first_champion_and_a_challenger_must_win_the_paired_test(
    registry,
) -> None:
    cfg, tracker, register = registry()
    base = register(**{"arenaflow.role": "base"})
    fin = register()
    # Higher rated, but its paired interval reaches below zero: the base stays and is served.
    close = both(pair(30.0, -12.0, 75.0, 0.88), {})
    out = promote_champion(
        cfg,
        board(row("finetuned", 1030, 990, 1075), row("base", 1000, 1000, 1000, 2), paired=close),
        fin,
        base,
    )
    assert not out["promoted"] and out["outcome"] == "kept"
    assert out["seeded_base"] == "1" and out["version"] == "1" and out["served_role"] == "base"
    assert "not significantly better" in out["reason"] and "P(better) 0.88" in out["reason"]
    assert out["diff_lower"] == -12.0 and out["p_better"] == 0.88
    assert out["competitor_versions"] == {"finetuned": "2", "base": "1"}
    info = tracker.get_version(NAME, alias="champion")
    assert info.version == "1" and info.tags["arenaflow.role"] == "base"
    v2 = tracker.get_version(NAME, version="2")
    assert v2.tags["arenaflow.decision"] == "kept"
    assert v2.tags["arenaflow.vs_champion_p_better"] == "0.880"
    assert v2.tags["arenaflow.lineage.data_hash"] == "abc"
    assert v2.tags["arenaflow.lineage.training_run"] == fin["run_id"]

    # Clear evidence: promoted over the base, with the interval in the reason and the tags.
    clear = both(pair(120.0, 40.0, 210.0, 0.999), {})
    out = promote_champion(
        cfg,
        board(row("finetuned", 1120, 1040, 1210), row("base", 1000, 1000, 1000, 2), paired=clear),
        fin,
        base,
    )
    assert out["promoted"] and out["outcome"] == "promoted" and out["version"] == "2"
    assert out["reason"].startswith("promoted finetuned (v2) over champion v1 (base)")
    assert out["served_role"] == "fine-tuned" and out["seeded_base"] is None
    assert tracker.get_version(NAME, version="2").tags["arenaflow.promoted_over"] == "1"


def test_a_challenger_below_the_champion_inside_its_interval_is_never_promoted(registry) -> None:
    cfg, tracker, register = registry(
        "evaluate.competitors=[{name: finetuned, local: finetuned}, {name: champ, local: 'models:/arenaflow-chat@champion'}, {name: base, local: base}]"
    )
    base = register(**{"arenaflow.role": "base"})
    tracker.set_alias(NAME, "champion", register()["version"])  # v2 is the champion
    fin = register()  # v3
    # The old rule (point rating >= champion's lower bound: 1090 >= 1040) would promote it.
    paired = {
        "finetuned": {"champ": pair(-10.0, -60.0, 40.0, 0.35), "base": pair(90, 20, 160, 0.99)},
        "champ": {"finetuned": pair(10.0, -40.0, 60.0, 0.65), "base": pair(100, 30, 170, 0.99)},
        "base": {"finetuned": pair(-90, -160, -20, 0.01), "champ": pair(-100, -170, -30, 0.01)},
    }
    lb = board(
        row("champ", 1100, 1040, 1160),
        row("finetuned", 1090, 1030, 1150),
        row("base", 1000, 1000, 1000, 2),
        paired=paired,
    )
    out = promote_champion(cfg, lb, fin, base)
    assert not out["promoted"] and out["version"] == "2"
    assert out["challenger"] == "finetuned" and out["incumbent"] == "champ"
    assert out["comparison"] == "paired bootstrap on this run's battles"
    assert "-10.0 [-60.0, +40.0]" in out["reason"]


def test_a_judge_that_failed_calibration_cannot_promote(registry) -> None:
    cfg, tracker, register = registry()
    base, fin = register(**{"arenaflow.role": "base"}), register()
    failed = {"passed": False, "summary": "judge j failed calibration (tie_rate 0.90 > 0.35)"}
    clear = both(pair(300.0, 200.0, 400.0, 1.0), {})
    lb = board(
        row("finetuned", 1300, 1200, 1400),
        row("base", 1000, 1000, 1000, 2),
        paired=clear,
        calibration=failed,
    )
    out = promote_champion(cfg, lb, fin, base)
    assert not out["promoted"] and out["version"] == "1"
    assert "failed calibration (tie_rate 0.90 > 0.35)" in out["reason"]
    # Human votes alone (no judge battles on the board) do not need the judge.
    humans = lb | {"rating_on": "human", "battles_by_source": {"judge": 6, "human": 40}}
    assert promote_champion(cfg, humans, fin, base)["promoted"]


def test_a_champion_outside_the_run_is_compared_through_its_tags(registry, make_cfg) -> None:
    cfg, tracker, register = registry()
    base = register(**{"arenaflow.role": "base"})
    v2 = register()
    clear = both(pair(100.0, 50.0, 150.0, 1.0), {})
    lb = board(row("finetuned", 1100, 1050, 1150), row("base", 1000, 1000, 1000, 2), paired=clear)
    assert promote_champion(cfg, lb, v2, base)["version"] == "2"  # v2 tagged [1050, 1150]
    # The next fine-tune beats the base but not v2's recorded upper bound: unpaired, stricter.
    lb3 = board(row("finetuned", 1160, 1110, 1210), paired={}, scale=SCALE)
    out = promote_champion(
        make_cfg("evaluate.competitors=[{name: finetuned}]"), lb3, register(), base
    )
    assert not out["promoted"] and out["version"] == "2"
    assert "version tags" in out["comparison"] and out["diff_lower"] == pytest.approx(-40.0)
    lb4 = board(row("finetuned", 1260, 1200, 1320), paired={}, scale=SCALE)
    out = promote_champion(
        make_cfg("evaluate.competitors=[{name: finetuned}]"), lb4, register(), base
    )
    assert out["promoted"] and out["version"] == "4"
    # Unanchored ratings never compare across runs.
    lb5 = board(row("finetuned", 1500, 1400, 1600), scale="unanchored")
    out = promote_champion(
        make_cfg("evaluate.competitors=[{name: finetuned}]"), lb5, register(), base
    )
    assert not out["promoted"] and out["outcome"] == "no_decision"
    assert "models:/arenaflow-chat@champion" in out["reason"]
    # A dry run decides but moves nothing.
    dry = make_cfg("rating.promote=false", "evaluate.competitors=[{name: finetuned}]")
    lb6 = board(row("finetuned", 1500, 1400, 1600), paired={}, scale=SCALE)
    out = promote_champion(dry, lb6, register(), base)
    assert not out["promoted"] and "rating.promote=false" in out["reason"]
    assert tracker.get_version(NAME, alias="champion").version == "4"


def test_a_dry_run_does_not_seed_the_base(registry, make_cfg) -> None:
    _, tracker, register = registry()
    base, fin = register(**{"arenaflow.role": "base"}), register()
    dry = make_cfg("rating.promote=false")
    lb = board(row("finetuned", 1100, 1050, 1150), row("base", 1000, 1000, 1000, 2))
    out = promote_champion(dry, lb, fin, base)
    assert out["outcome"] == "no_decision" and out["version"] is None
    assert tracker.get_version(NAME, alias="champion") is None


def test_paired_interval_is_narrower_than_the_two_cis_and_decides_on_real_fits() -> None:
    # a beats c narrowly, b sits between; every battle is resampled jointly.
    rows = (
        [("a", "b", "model_a")] * 12
        + [("a", "b", "model_b")] * 8
        + [("b", "c", "model_a")] * 12
        + [("b", "c", "model_b")] * 8
        + [("a", "c", "model_a")] * 14
        + [("a", "c", "model_b")] * 6
    )
    df = pd.DataFrame(rows, columns=["model_a", "model_b", "winner"])
    point = compute_bt(df, anchor=("c", 1000))
    boot = compute_bootstrap_bt(df, 300, 0, anchor=("c", 1000))
    paired = paired_differences(boot, point, 0.95)
    ab = paired["a"]["b"]
    assert ab["diff"] == pytest.approx(point["a"] - point["b"])
    assert ab["lower"] < ab["diff"] < ab["upper"]
    assert paired["b"]["a"]["lower"] == pytest.approx(-ab["upper"])
    assert paired["a"]["c"]["p_better"] > 0.95 and paired["a"]["c"]["lower"] > 0
    separate = (boot["a"].quantile(0.975) - boot["a"].quantile(0.025)) + (
        boot["b"].quantile(0.975) - boot["b"].quantile(0.025)
    )
    assert ab["upper"] - ab["lower"] < separate
    champ = ModelVersionInfo(NAME, "1", "src", None, {})
    rows_lb = [{"model": m, "rating": float(point[m])} for m in point.index]
    d = decide(rows_lb, paired, {"a": "2", "c": "1"}, champ, SCALE)
    assert d.promoted and d.p_better == paired["a"]["c"]["p_better"]
    d = decide(rows_lb, paired, {"a": "2", "c": "1"}, champ, SCALE, margin=1e6)
    assert not d.promoted and "promote_margin=1e+06" in d.reason
