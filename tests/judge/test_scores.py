"""Score aggregation against numbers computed by hand (FastChat show_result semantics), and health."""

from __future__ import annotations

import pytest

from arenaflow.judge.scores import (
    category_scores,
    judge_health,
    pairwise_results,
    radar_figure,
    single_scores,
)


def single(model: str, qid: int, cat: str, turn: int, score: float, length: int) -> dict:
    source = "text" if score != -1 else "none"
    return {
        "question_id": qid,
        "model": model,
        "category": cat,
        "turn": turn,
        "score": score,
        "answer_len": length,
        "verdict_source": source,
    }


SINGLES = [
    single("A", 81, "writing", 1, 8, 100),
    single("A", 81, "writing", 2, 5, 200),
    single("A", 111, "math", 1, 6, 60),
    single("A", 121, "coding", 1, -1, 500),
    single("B", 81, "writing", 1, 3, 20),
    single("B", 81, "writing", 2, -1, 40),
    single("B", 111, "math", 2, -1, 40),
]


def pair(qid: int, turn: int, g1: str, g2: str) -> dict:
    return {
        "question_id": qid,
        "model_1": "A",
        "model_2": "B",
        "g1_winner": g1,
        "g2_winner": g2,
        "turn": turn,
        "g1_verdict_source": "none" if g1 == "error" else "text",
        "g2_verdict_source": "none" if g2 == "error" else "text",
    }


PAIRS = [
    pair(81, 1, "model_1", "model_1"),  # A wins
    pair(81, 2, "model_1", "model_2"),  # orders disagree: tie
    pair(111, 1, "tie", "tie"),  # tie
    pair(111, 2, "model_2", "model_2"),  # B wins
    pair(121, 1, "error", "model_1"),  # unparsed order: counted as error, not scored
]


def test_single_scores_exclude_unparsed_and_average_all_scored_turns() -> None:
    table = single_scores(SINGLES)
    # A: turn 1 = (8 + 6) / 2, turn 2 = 5, average over all three scored turns = 19 / 3
    assert table["A"]["turn1"] == pytest.approx(7.0)
    assert table["A"]["turn2"] == pytest.approx(5.0)
    assert table["A"]["average"] == pytest.approx(19 / 3)  # not the mean of turn means (6.0)
    assert (table["A"]["scored"], table["A"]["unparsed"]) == (3, 1)
    # B: only turn 1 scored
    assert table["B"] == {
        "turn1": 3.0,
        "turn2": None,
        "average": 3.0,
        "expected": None,
        "scored": 1,
        "unparsed": 2,
    }


def test_expected_scores_average_beside_the_argmax() -> None:
    rows = [
        {"model": "A", "turn": 1, "score": 8.0, "expected_score": 7.5},
        {"model": "A", "turn": 2, "score": 6.0, "expected_score": 6.1},
        {"model": "A", "turn": 2, "score": -1, "expected_score": 2.0},  # unparsed: left out
    ]
    table = single_scores(rows)["A"]
    assert table["average"] == 7.0 and table["expected"] == pytest.approx(6.8)


def test_category_scores() -> None:
    cats = category_scores(SINGLES)
    assert cats["A"] == {"math": 6.0, "writing": 6.5}
    assert cats["B"] == {"writing": 3.0}


def test_pairwise_win_loss_tie_and_win_rate() -> None:
    res = pairwise_results(PAIRS)
    assert {k: res["A"][k] for k in ("win", "loss", "tie", "error")} == {
        "win": 1,
        "loss": 1,
        "tie": 2,
        "error": 1,
    }
    assert res["A"]["win_rate"] == pytest.approx(1 / 4)
    assert res["A"]["win_rate_adjusted"] == pytest.approx((1 + 0.5 * 2) / 4)
    assert res["B"]["win_rate_adjusted"] == pytest.approx(0.5)


def test_judge_health() -> None:
    health = judge_health(SINGLES, PAIRS)
    assert health["replies"] == 7 + 10
    assert health["parse_failures"] == 4  # three -1 scores and one unparsed pairwise order
    assert health["parse_failure_rate"] == pytest.approx(4 / 17)
    assert health["position_consistency"] == pytest.approx(3 / 4)
    # length bias: Pearson r of (answer length, score) over the four scored answers, by hand
    xs, ys = [100, 200, 60, 20], [8, 5, 6, 3]
    mx, my = sum(xs) / 4, sum(ys) / 4
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    vx = sum((x - mx) ** 2 for x in xs)
    vy = sum((y - my) ** 2 for y in ys)
    assert health["length_bias"] == pytest.approx(cov / (vx * vy) ** 0.5)


def test_radar_figure_has_one_polygon_per_model() -> None:
    fig = radar_figure(category_scores(SINGLES))
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2
    assert sorted(t.get_text() for t in ax.get_xticklabels()) == ["math", "writing"]
