"""Judge calibration over HTTP: a judge that always ties or always says "A" fails, one that prefers
the reference answer passes; thresholds come from conf/judge; calibration is cached and costed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from judge_standin import StandIn, api_overrides, read_rows, write_inputs

from arenaflow.judge import judge
from arenaflow.judge.calibration import CHECKS, NULL_ANSWERS, null_answer

# experiment=test: 1 question per reference category (math, reasoning, coding), turn 1:
# 4 single gradings (reference + 3 null answers) and 3 nulls x 2 orders pairwise each.
CALIBRATION_CALLS = 3 * (4 + 6)


def always(pairwise: str, single: str):
    def reply(body: dict[str, Any]) -> str:
        system = body["messages"][0]["content"]
        return pairwise if "[[A]]" in system else single

    return reply


def run(stand_in: StandIn, make_cfg, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    inputs = write_inputs(tmp_path, question_ids=(81,))
    overrides = {"judge.calibration.per_category": 1, **extra}
    cfg = make_cfg(*api_overrides(stand_in.url, **overrides))
    return judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])


def test_a_judge_that_prefers_the_reference_passes(stand_in: StandIn, make_cfg, tmp_path) -> None:
    out = run(
        stand_in,
        make_cfg,
        tmp_path,
        **{"judge.price_per_1k_tokens": "{prompt: 1.0, completion: 2.0}"},
    )
    cal = out["calibration"]
    assert cal["passed"] is True, cal["summary"]
    f = cal["figures"]
    assert f["calls"] == CALIBRATION_CALLS and f["questions"] == 3
    assert f["single_strong_mean"] == 9.0 and f["single_null_mean"] == 3.0
    assert f["single_separation"] == 6.0 and f["single_accuracy"] == 1.0
    assert f["pairwise_accuracy"] == 1.0 and f["swap_consistency"] == 1.0
    assert f["tie_rate"] == 0.0 and f["parse_failure_rate"] == 0.0
    # calibration calls are judge calls: counted, and in the cost (100 + 10 tokens each)
    calls = out["counts"]["calls_made"]
    assert (
        calls == 8 + CALIBRATION_CALLS and out["counts"]["calibration_calls"] == CALIBRATION_CALLS
    )
    assert out["cost_usd"] == pytest.approx(calls * (100 * 1.0 + 10 * 2.0) / 1000)
    rows = read_rows(cal["uri"])
    assert len(rows) == CALIBRATION_CALLS
    assert {r["answer"] for r in rows if r["kind"] == "single"} == {"reference", *NULL_ANSWERS}
    assert {(r["null"], r["strong_as"]) for r in rows if r["kind"] == "pair"} == {
        (n, s) for n in NULL_ANSWERS for s in ("A", "B")
    }
    # anchors are never competitors
    assert set(out["competitors"]) == {"finetuned", "base"}
    # a second run pays nothing for calibration (cached per judge identity)
    hits = len(stand_in.hits)
    again = run(stand_in, make_cfg, tmp_path)
    assert again["counts"]["calls_made"] == 0 and len(stand_in.hits) == hits
    assert again["calibration"]["passed"] is True
    # thresholds come from the config: an impossible bar fails the same verdicts
    strict = run(stand_in, make_cfg, tmp_path, **{"judge.calibration.min_single_separation": 7})
    assert strict["calibration"]["passed"] is False
    assert strict["calibration"]["failed"] == ["single_separation 6.00 < 7"]


@pytest.mark.parametrize(
    ("reply", "fails"),
    [
        (
            always("Equal. [[C]]", "Rating: [[5]]"),
            {"single_separation", "pairwise_accuracy", "tie_rate"},
        ),
        (
            always("A. [[A]]", "Rating: [[7]]"),
            {"single_separation", "pairwise_accuracy", "swap_consistency"},
        ),
        (always("No verdict here.", "No rating here."), set(CHECKS)),
    ],
    ids=["always-tie", "always-A", "never-parses"],
)
def test_a_judge_that_cannot_tell_fails(stand_in, make_cfg, tmp_path, reply, fails) -> None:
    stand_in.policy = reply
    cal = run(stand_in, make_cfg, tmp_path)["calibration"]
    assert cal["passed"] is False
    assert {line.split()[0] for line in cal["failed"]} == fails
    assert "failed calibration" in cal["summary"] and "judge=gpt4" in cal["summary"]


def test_no_calibration_items_is_not_a_pass(stand_in, make_cfg, tmp_path) -> None:
    cal = run(stand_in, make_cfg, tmp_path, **{"judge.calibration.per_category": 0})["calibration"]
    assert cal["passed"] is False and cal["figures"]["calls"] == 0
    assert any("no calibration items" in line for line in cal["failed"])


def test_null_answers() -> None:
    assert [null_answer(k, "What is 2+2?") for k in NULL_ANSWERS] == [
        "",
        "I don't know.",
        "What is 2+2?",
    ]
