"""Decontamination on a hand-made SFT file: overlapping conversations are found and listed."""

from __future__ import annotations

import json

from arenaflow import io
from arenaflow.evaluate import decontaminate
from arenaflow.evaluate.questions import load_questions, question_source


def test_overlap_is_reported(make_cfg) -> None:
    cfg = make_cfg("evaluate.decontamination.threshold=0.2")
    q81 = {q["question_id"]: q for q in load_questions(question_source(cfg))[0]}[81]
    rows = [
        {"id": "leak", "conversations": [{"from": "human", "value": "Please: " + q81["turns"][0]}]},
        {
            "id": "clean",
            "conversations": [{"from": "human", "value": "How do I bake bread at home?"}],
        },
    ]
    sft = io.artifact_uri(cfg, "data", "sharegpt_clean.jsonl")
    io.write_text(sft, "\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    report = decontaminate(cfg)
    assert report["conversations_scanned"] == 2 and report["skipped"] == {
        "malformed_conversation": 1
    }
    assert report["contaminated_question_ids"] == [81]
    assert [c["id"] for c in report["conversations"]] == ["leak"]
    assert report["conversations"][0]["sources"] == ["question"]
    assert report["contaminated_share"] == round(1 / 3, 4) and report["above_threshold"] is True
    assert io.read_json(report["uri"])["contaminated_question_ids"] == [81]
