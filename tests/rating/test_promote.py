"""Eval-gated promotion against a real MLflow registry in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from arenaflow.rating import promote_champion
from arenaflow.tracking import tracker_from_cfg

NAME = "arenaflow-chat"
SCALE = "anchor=base@1000;judge=j;bench=mt_bench"


def row(model: str, rating: float, lo: float, hi: float, rank: int = 1) -> dict:
    return {
        "model": model,
        "rating": rating,
        "ci_lower": lo,
        "ci_upper": hi,
        "rank": rank,
        "mt_bench": 5.0,
    }


def board(*rows: dict, scale: str = SCALE) -> dict:
    return {
        "rows": list(rows),
        "scale": scale,
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

        def register() -> dict:
            with tracker.start_run("train", cfg) as run:
                info = tracker.register_model(run, ckpt, NAME, tags={"data_hash": "abc"})
            return {
                "model_uri": f"models:/{NAME}/{info.version}",
                "version": info.version,
                "run_id": run.run_id,
            }

        return cfg, tracker, register

    return _make


def test_promotion_rule_across_runs(registry, make_cfg) -> None:
    cfg, tracker, register = registry()
    v1 = register()
    out = promote_champion(
        cfg, board(row("finetuned", 1100, 1050, 1150), row("base", 1000, 1000, 1000, 2)), v1
    )
    assert out["promoted"] and out["reason"] == "no current champion"
    assert out["version"] == "1" and out["model_uri"] == f"models:/{NAME}@champion"
    info = tracker.get_version(NAME, alias="champion")
    assert info.version == "1"
    assert (
        info.tags["arenaflow.rating_ci_lower"] == "1050.00"
        and info.tags["arenaflow.rating_scale"] == SCALE
    )
    assert info.tags["arenaflow.lineage.data_hash"] == "abc"
    assert info.tags["arenaflow.lineage.training_run"] == v1["run_id"]
    assert info.tags["arenaflow.lineage.answers"].endswith(
        "mt_bench/mt_bench/model_answer/finetuned.jsonl"
    )
    assert info.tags["arenaflow.lineage.rating"] == "rating-run"
    assert out["not_candidates"] == {"base": "not a registered model"}

    # The champion is not a competitor: its tags on the same scale set the bar.
    out = promote_champion(cfg, board(row("finetuned", 1060, 1010, 1110)), register())
    assert out["promoted"] and out["bar"] == 1050 and out["bar_source"] == "champion's version tags"
    out = promote_champion(cfg, board(row("finetuned", 1000, 950, 1050)), register())
    assert not out["promoted"] and out["bar"] == 1010 and "the alias stays" in out["reason"]
    assert out["version"] == "2" and out["candidate_version"] == "3"
    assert tracker.get_version(NAME, version="3").tags["arenaflow.rating"] == "1000.00"
    # Unanchored ratings never compare across runs.
    out = promote_champion(
        cfg, board(row("finetuned", 1500, 1400, 1600), scale="unanchored"), register()
    )
    assert not out["promoted"] and "not a competitor of this run" in out["reason"]
    assert "models:/arenaflow-chat@champion" in out["reason"]
    # A dry run decides but moves nothing; an unregistered model is no candidate.
    dry = make_cfg("rating.promote=false")
    out = promote_champion(dry, board(row("finetuned", 1200, 1150, 1250)), register())
    assert not out["promoted"] and "rating.promote=false" in out["reason"]
    out = promote_champion(
        dry, board(row("finetuned", 1200, 1150, 1250)), {"model_uri": None, "version": None}
    )
    assert out["reason"] == "no competitor on the leaderboard has a registry version"
    assert tracker.get_version(NAME, alias="champion").version == "2"


def test_champion_among_competitors_sets_the_bar_from_this_run(registry) -> None:
    cfg, tracker, register = registry(
        "eval.competitors=[{name: finetuned, local: finetuned}, {name: champ, local: 'models:/arenaflow-chat@champion'}]"
    )
    tracker.set_alias(NAME, "champion", register()["version"])
    v2 = register()
    out = promote_champion(
        cfg, board(row("finetuned", 1120, 1060, 1180), row("champ", 1100, 1040, 1160)), v2
    )
    assert out["promoted"] and out["bar"] == 1040 and out["bar_source"] == "this run (champ)"
    assert out["competitor_versions"] == {"finetuned": "2", "champ": "1"}
    assert tracker.get_version(NAME, alias="champion").version == "2"
    assert tracker.get_version(NAME, version="2").tags["arenaflow.promoted_over"] == "1"
    # Next run: the champion (now v2) rates best itself, so nothing moves.
    out = promote_champion(
        cfg,
        board(row("champ", 1120, 1060, 1180), row("finetuned", 1000, 950, 1050)),
        v2 | {"version": "2"},
    )
    assert not out["promoted"] and out["reason"] == "version 2 already is the champion"
