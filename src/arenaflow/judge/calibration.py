"""Judge calibration: before its verdicts may move the champion, the judge grades answers whose
order is known.

For a few questions per category that has reference answers (turn 1), the strong answer is the
reference and the null answers are an empty answer, "I don't know." and the question repeated
back. The judge grades each (single, with the prompt the real run uses for that category) and
compares the strong answer with each null one in both orders (pairwise). A judge that cannot
tell them apart cannot tell a fine-tune from its base either. The anchors are judge calls like any
other (same cache, same budget), never competitors: they appear on no leaderboard.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from arenaflow.judge.mtbench import make_item
from arenaflow.judge.prompts import (
    needs_reference,
    pair_user_prompt,
    prompt_names,
    single_user_prompt,
)
from arenaflow.judge.runner import ItemResult, JudgeItem

NULL_ANSWERS = ("empty", "idk", "echo")
STRONG = "reference"

# figure -> (threshold key in judge.calibration, "min" | "max", what it measures)
CHECKS = {
    "single_separation": ("min_single_separation", "min", "mean score strong - null (points)"),
    "pairwise_accuracy": ("min_pairwise_accuracy", "min", "strong-vs-null comparisons won"),
    "swap_consistency": ("min_swap_consistency", "min", "same verdict in both orders"),
    "tie_rate": ("max_tie_rate", "max", "comparisons called a tie"),
    "parse_failure_rate": ("max_parse_failure_rate", "max", "calls with no readable verdict"),
}
FIX = (
    "use a judge that can tell a reference answer from a null one: judge=gpt4, "
    "judge=openai_compatible with a stronger model, or judge.model=<a stronger local checkpoint>"
)


def null_answer(kind: str, question: str) -> str:
    return {"empty": "", "idk": "I don't know.", "echo": question}[kind]


@dataclass
class CalibrationPlan:
    items: list[JudgeItem] = field(default_factory=list)
    singles: list[dict[str, Any]] = field(default_factory=list)  # question_id, answer, _key
    pairs: list[dict[str, Any]] = field(default_factory=list)  # question_id, null, strong_as, _key


def pick_questions(
    questions: list[dict[str, Any]], references: Mapping[int, list[str]], per_category: int
) -> list[dict[str, Any]]:
    """The first `per_category` questions (by id) of each category that has reference answers."""
    taken: Counter = Counter()
    out = []
    for q in sorted(questions, key=lambda q: int(q["question_id"])):
        cat = q.get("category", "")
        has_ref = needs_reference(cat) and references.get(int(q["question_id"]))
        if has_ref and taken[cat] < per_category:
            taken[cat] += 1
            out.append(q)
    return out


def build_calibration(
    questions: list[dict[str, Any]],
    references: Mapping[int, list[str]],
    prompts: dict[str, dict[str, Any]],
    *,
    judge_model: str,
    settings: dict[str, Any],
    per_category: int,
) -> CalibrationPlan:
    """Single grading of the strong and every null answer, and strong vs null in both orders."""
    plan = CalibrationPlan()
    for q in pick_questions(questions, references, per_category):
        qid, ref = int(q["question_id"]), list(references[int(q["question_id"])])
        names = prompt_names(q.get("category", ""), 1)
        answers = {STRONG: ref[0], **{k: null_answer(k, q["turns"][0]) for k in NULL_ANSWERS}}
        single, pair = prompts[names.single], prompts[names.pair]
        for answer, text in answers.items():
            user = single_user_prompt(single, q, [text], 1, ref)
            it = make_item(single, user, ref, judge_model, settings, question_id=qid, turn=1)
            plan.items.append(it)
            plan.singles.append({"question_id": qid, "answer": answer, "_key": it.key})
        for null in NULL_ANSWERS:
            for strong_as in ("A", "B"):
                a, b = (ref[0], answers[null]) if strong_as == "A" else (answers[null], ref[0])
                user = pair_user_prompt(pair, q, [a], [b], 1, ref)
                it = make_item(pair, user, ref, judge_model, settings, question_id=qid, turn=1)
                plan.items.append(it)
                plan.pairs.append(
                    {"question_id": qid, "null": null, "strong_as": strong_as, "_key": it.key}
                )
    return plan


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def calibration_figures(plan: CalibrationPlan, results: Mapping[str, ItemResult]) -> dict[str, Any]:
    """Separation, pairwise accuracy, swap consistency, tie and parse-failure rates."""
    keys = [it.key for it in plan.items]
    unread = sum(1 for k in keys if results[k].error or not results[k].verdict.parsed)
    scores: dict[int, dict[str, float]] = defaultdict(dict)
    for s in plan.singles:
        score = results[s["_key"]].verdict.score
        if score is not None:
            scores[s["question_id"]][s["answer"]] = float(score)
    strong = [v[STRONG] for v in scores.values() if STRONG in v]
    null = [v[k] for v in scores.values() for k in NULL_ANSWERS if k in v]
    both = [
        (v[STRONG], v[k]) for v in scores.values() for k in NULL_ANSWERS if {STRONG, k} <= set(v)
    ]
    # A pairwise verdict in terms of the answers: "strong", "null" or "tie".
    picks: dict[tuple[int, str], dict[str, str]] = defaultdict(dict)
    for p in plan.pairs:
        winner = results[p["_key"]].verdict.winner
        if winner is not None:
            pick = "tie" if winner == "tie" else ("strong" if winner == p["strong_as"] else "null")
            picks[(p["question_id"], p["null"])][p["strong_as"]] = pick
    verdicts = [pick for per in picks.values() for pick in per.values()]
    orders = [per for per in picks.values() if len(per) == 2]
    mean_strong, mean_null = _mean(strong), _mean(null)
    return {
        "questions": len({s["question_id"] for s in plan.singles}),
        "calls": len(keys),
        "single_strong_mean": mean_strong,
        "single_null_mean": mean_null,
        "single_separation": None
        if mean_strong is None or mean_null is None
        else mean_strong - mean_null,
        "single_accuracy": _share(sum(s > n for s, n in both), len(both)),
        "pairwise_accuracy": _share(verdicts.count("strong"), len(verdicts)),
        "swap_consistency": _share(sum(per["A"] == per["B"] for per in orders), len(orders)),
        "tie_rate": _share(verdicts.count("tie"), len(verdicts)),
        "parse_failure_rate": _share(unread, len(keys)),
    }


def judge_calibration(
    figures: dict[str, Any], thresholds: Mapping[str, Any], judge_model: str
) -> dict[str, Any]:
    """Pass/fail against `judge.calibration` thresholds, with one line that says why and the fix."""
    rows, failed = [], []
    for figure, (key, side, what) in CHECKS.items():
        value, limit = figures.get(figure), float(thresholds[key])
        ok = value is not None and (value >= limit if side == "min" else value <= limit)
        rows.append({"figure": figure, "value": value, side: limit, "passed": ok, "measures": what})
        if not ok:
            shown = "no data" if value is None else f"{value:.2f}"
            failed.append(f"{figure} {shown} {'<' if side == 'min' else '>'} {limit:g}")
    passed = not failed and figures.get("calls", 0) > 0
    if figures.get("calls", 0) == 0:
        failed.append("no calibration items (judge.calibration.per_category=0 or no references)")
    summary = (
        f"judge {judge_model} passed calibration on {figures.get('questions', 0)} questions"
        if passed
        else f"judge {judge_model} failed calibration ({'; '.join(failed)}); {FIX}"
    )
    return {
        "passed": passed,
        "summary": summary,
        "failed": failed,
        "figures": figures,
        "checks": rows,
    }


def calibration_records(
    plan: CalibrationPlan, results: Mapping[str, ItemResult]
) -> list[dict[str, Any]]:
    """Every calibration call with its verdict, for the judgment folder and MLflow."""
    out = []
    for kind, rows in (("single", plan.singles), ("pair", plan.pairs)):
        for row in rows:
            r = results[row["_key"]]
            v = r.verdict
            out.append(
                {
                    "kind": kind,
                    **{k: val for k, val in row.items() if k != "_key"},
                    "score": v.score,
                    "winner": v.winner,
                    "verdict_source": v.source,
                    "parse_error": v.error,
                    "expected_score": v.expected_score,
                    "probs": v.probs,
                    "judgment": r.judgment if not r.error else f"$ERROR$ {r.error}",
                }
            )
    return out
