"""MT-bench questions from the real package data; selection and bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arenaflow import io
from arenaflow.evaluate.questions import (
    load_questions,
    load_references,
    question_source,
    reference_source,
    select_questions,
    write_questions,
)


def test_package_questions_and_references(make_cfg) -> None:
    cfg = make_cfg("evaluate=mt_bench")
    questions, skipped = load_questions(question_source(cfg))
    assert len(questions) == 80 and not skipped
    assert {q["category"] for q in questions} >= {"writing", "math", "coding", "humanities"}
    assert all(len(q["turns"]) == 2 for q in questions)
    refs = load_references(reference_source(cfg))
    assert 101 in refs and len(refs[101]) == 2
    assert len(select_questions(questions, limit_per_category=2)) == 16


def test_test_experiment_writes_selected_questions(make_cfg) -> None:
    cfg = make_cfg()
    out = write_questions(cfg)
    assert out["question_ids"] == [81, 111, 121] and out["count"] == 3
    assert out["uri"].endswith("mt_bench/mt_bench/question.jsonl")
    assert [q["question_id"] for q in io.read_jsonl(out["uri"])] == [81, 111, 121]


def test_bad_records_are_counted_and_bad_ids_named(tmp_path: Path, make_cfg) -> None:
    good = {"question_id": 1, "category": "writing", "turns": ["a", "b"]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"question_id": "x", "category": "writing", "turns": ["a"]}),
        json.dumps({"question_id": 2, "category": "math", "turns": []}),
        json.dumps(good),
    ]
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(lines) + "\n")
    questions, skipped = load_questions(f"file://{path}")
    assert [q["question_id"] for q in questions] == [1]
    assert skipped == {
        "invalid_json": 1,
        "bad_question_id": 1,
        "bad_turns": 1,
        "duplicate_question_id": 1,
    }
    cfg = make_cfg(f"evaluate.question_file=file://{path}", "evaluate.question_ids=[1,99]")
    with pytest.raises(ValueError, match=r"evaluate.question_ids \[99\]"):
        write_questions(cfg)
