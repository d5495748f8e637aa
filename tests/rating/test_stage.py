"""`run(cfg)`, the entry point `python -m arenaflow.rating` calls, on judgment files in the FastChat layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from arenaflow import io
from arenaflow.judge.stage import calibration_uris, judgment_uris
from arenaflow.rating import run
from arenaflow.tracking import tracker_from_cfg


def test_run_reads_the_judge_layout_and_crowns_the_latest_version(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("rating.bootstrap_rounds=30")
    single_uri, pair_uri = judgment_uris(cfg)
    pairs, singles = [], []
    for q in (81, 111, 121):
        for turn in (1, 2):
            g = "model_1" if q != 121 else "model_2"
            pairs.append(
                {
                    "question_id": q,
                    "model_1": "finetuned",
                    "model_2": "base",
                    "g1_winner": g,
                    "g2_winner": g,
                    "judge": ["j", "pair-v2"],
                    "turn": turn,
                    "tstamp": q + turn,
                }
            )
            for model, score in (("finetuned", 7), ("base", 4)):
                singles.append(
                    {
                        "question_id": q,
                        "model": model,
                        "judge": ["j", "single-v1"],
                        "score": score if turn == 1 else -1,
                        "turn": turn,
                        "tstamp": 1.0,
                    }
                )
    io.write_jsonl(pair_uri, pairs)
    io.write_jsonl(single_uri, singles)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("train", cfg) as r:
        tracker.register_model(r, ckpt, "arenaflow-chat", tags={"arenaflow.role": "base"})
        tracker.register_model(r, ckpt, "arenaflow-chat")
    calibrated = {"passed": True, "summary": "judge j passed calibration", "figures": {}}
    io.write_json(calibration_uris(cfg)[1], calibrated)

    out = run(cfg)
    assert out["battles"]["count"] == 6 and out["battles"]["by_origin"] == {
        "mt_bench": 6,
        "arena": 0,
    }
    assert out["battles"]["by_source"] == {"judge": 6, "human": 0}
    rows = {r["model"]: r for r in out["leaderboard"]["rows"]}
    assert rows["finetuned"]["rating"] > rows["base"]["rating"] == pytest.approx(1000.0)
    assert rows["finetuned"]["mt_bench"] == 7.0 and rows["finetuned"]["wins"] == 4
    # the base (v1) is the first champion; the fine-tune (v2) won 4 of 6, lost 2: not enough
    champion = out["champion"]
    assert champion["competitor_versions"] == {"finetuned": "2", "base": "1"}
    assert champion["seeded_base"] == "1" and champion["version"] == "1"
    assert not champion["promoted"] and champion["challenger"] == "finetuned"
    assert champion["diff_lower"] < 0 < champion["diff"] and 0.5 < champion["p_better"] < 1
    # with the judge's calibration file gone, the judge is uncalibrated and cannot promote
    Path(calibration_uris(cfg)[1]).unlink()
    again = run(cfg)["champion"]
    assert not again["promoted"] and "the judge was not calibrated" in again["reason"]
    report = io.read_json(out["leaderboard"]["uri"])
    assert report["bootstrap_rounds"] == 30 and report["battle_count"]["finetuned"]["base"] == 6
    assert io.exists(io.artifact_uri(cfg, "rating", "plots", "rating_ci.png"))
