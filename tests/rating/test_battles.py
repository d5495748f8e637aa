"""Battles from pairwise judgments (swap rule) and from external battle files, bad rows counted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from arenaflow import io
from arenaflow.rating import build_battles
from arenaflow.rating.battles import battles_from_pairwise, swap_rule

CASES = Path(__file__).parent / "cases"


def judgment(
    q: int, g1: str, g2: str, m1: str = "finetuned", m2: str = "base", turn: int = 1
) -> dict:
    return {
        "question_id": q,
        "model_1": m1,
        "model_2": m2,
        "g1_winner": g1,
        "g2_winner": g2,
        "judge": ["judge", "pair-v2"],
        "turn": turn,
        "tstamp": 1.0 + q,
    }


@pytest.mark.parametrize("case", json.loads((CASES / "swap_rule.json").read_text()), ids=str)
def test_swap_rule(case: dict) -> None:
    assert swap_rule(case["g1"], case["g2"]) == case["winner"]


def test_bad_judgments_are_counted_by_reason() -> None:
    rows = [
        judgment(1, "model_1", "model_1"),
        judgment(1, "model_1", "model_1"),  # duplicate
        judgment(1, "model_1", "model_1", turn=2),
        judgment(2, "error", "model_1"),
        judgment(3, "A", "B"),
        judgment(4, "model_1", "model_1", m2="finetuned"),
        {"question_id": 5, "model_1": "x"},
        "not a dict",
    ]
    counts: Counter = Counter()
    out = list(battles_from_pairwise(rows, counts))
    assert [b["winner"] for b in out] == ["model_a", "model_a"]
    assert out[0]["source"] == "judge" and out[0]["origin"] == "mt_bench"
    assert out[0]["model_a"] == "finetuned"
    assert counts == Counter(
        valid=2,
        duplicate_judgment=1,
        judge_error=1,
        bad_verdict=1,
        self_battle=1,
        missing_model_2=1,
        not_an_object=1,
    )


def test_build_battles_merges_external_files(make_cfg, tmp_path: Path) -> None:
    pair = tmp_path / "pair.jsonl"
    io.write_jsonl(str(pair), [judgment(1, "model_2", "model_2"), judgment(2, "tie", "model_1")])
    arena_json = tmp_path / "arena.json"
    arena_json.write_text(
        json.dumps(
            [
                {
                    "model_a": "gpt-4",
                    "model_b": "base",
                    "winner": "model_a",
                    "tstamp": 0.5,
                    "anony": True,
                },
                {"model_a": "gpt-4", "model_b": "base", "winner": "tie (bothbad)", "tstamp": 0.7},
                {"model_a": "gpt-4", "model_b": "base", "winner": "model_c"},
                {"model_a": "gpt-4", "winner": "model_a"},
            ]
        )
    )
    arena_jsonl = tmp_path / "arena.jsonl"
    arena_jsonl.write_text(
        '{"model_a": "base", "model_b": "finetuned", "winner": "model_b", "tstamp": 9}\n{broken\n'
    )
    cfg = make_cfg(f"rating.external_battles=[{arena_json},{arena_jsonl}]")
    out = build_battles(cfg, {"pair_uri": str(pair), "judge_model": "judge"})
    assert out["count"] == 5
    assert out["by_origin"] == {"mt_bench": 2, str(arena_json): 2, str(arena_jsonl): 1, "arena": 0}
    assert out["by_source"] == {"judge": 2, "human": 3}  # arena exports without a judge: human
    assert out["human_votes"]["votes"] == 0 and "no vote database" in out["human_votes"]["note"]
    assert out["invalid"][str(arena_json)] == {"bad_winner": 1, "missing_model": 1}
    assert out["invalid"][str(arena_jsonl)] == {"bad_json": 1}
    rows = list(io.read_jsonl(out["uri"]))
    assert out["uri"].endswith("rating/battles.jsonl")
    assert [r["tstamp"] for r in rows] == sorted(r["tstamp"] for r in rows)  # Elo order by time
    assert rows[0]["origin"] == str(arena_json) and rows[0]["anony"] is True
    assert rows[0]["source"] == "human"


def test_missing_or_empty_inputs_name_the_fix(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    with pytest.raises(FileNotFoundError, match="materialize mt_bench_judgments"):
        build_battles(cfg, {"pair_uri": str(tmp_path / "nope.jsonl")})
    empty = tmp_path / "empty.jsonl"
    io.write_jsonl(str(empty), [judgment(1, "error", "error")])
    with pytest.raises(ValueError, match="no valid battles.*judge_error"):
        build_battles(cfg, {"pair_uri": str(empty)})
    cfg = make_cfg(f"rating.external_battles=[{tmp_path / 'missing.json'}]")
    with pytest.raises(FileNotFoundError, match="rating.external_battles"):
        build_battles(cfg, None)
