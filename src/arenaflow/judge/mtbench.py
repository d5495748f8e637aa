"""MT-bench judging: turn questions and competitors' answers into judge calls, and the verdicts
back into FastChat's single and pairwise judgment records.

Single mode grades every competitor's answer per turn (1-10); pairwise mode compares every pair
(or each competitor against a baseline) per turn in both orders, (A, B) then (B, A).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from arenaflow.judge.backends import ChatRequest, JudgeConfigError
from arenaflow.judge.cache import judgment_key
from arenaflow.judge.prompts import (
    needs_reference,
    pair_user_prompt,
    prompt_names,
    single_user_prompt,
)
from arenaflow.judge.runner import ItemResult, JudgeItem

log = logging.getLogger(__name__)

PAIR_MAPS = ({"A": "model_1", "B": "model_2"}, {"A": "model_2", "B": "model_1"})


@dataclass
class Plan:
    """Every judge call of a run, plus how single and pairwise records are assembled from them."""

    items: list[JudgeItem] = field(default_factory=list)
    singles: list[dict[str, Any]] = field(default_factory=list)  # record skeleton + item key
    pairs: list[dict[str, Any]] = field(default_factory=list)  # record skeleton + g1/g2 keys
    skipped: Counter = field(default_factory=Counter)  # reason -> count


def load_answers(rows: list[dict[str, Any]], model: str, skipped: Counter) -> dict[int, list[str]]:
    """Answer turns by question id; records without usable turns are counted, not used."""
    answers: dict[int, list[str]] = {}
    for row in rows:
        try:
            qid = int(row["question_id"])
            turns = row["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError, ValueError):
            skipped[f"bad answer record ({model})"] += 1
            continue
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            skipped[f"bad answer record ({model})"] += 1
            continue
        answers[qid] = turns
    return answers


def pairs_of(models: list[str], how: str, baseline: str | None) -> list[tuple[str, str]]:
    if how == "all":
        return list(itertools.combinations(models, 2))
    if how == "baseline":
        if baseline not in models:
            raise JudgeConfigError(
                f"judge.pairwise=baseline needs judge.baseline set to one of the competitors "
                f"{models}, got {baseline!r}"
            )
        return [(m, baseline) for m in models if m != baseline]
    raise JudgeConfigError(f"judge.pairwise must be 'all' or 'baseline', got {how!r}")


def make_item(
    prompt: dict[str, Any],
    user: str,
    reference: list[str] | None,
    judge_model: str,
    settings: dict[str, Any],
    **meta: Any,
) -> JudgeItem:
    """One judge call, keyed by everything that decides its verdict (the cache key)."""
    key = judgment_key(
        judge=judge_model,
        settings=settings,
        prompt_name=prompt["name"],
        system=prompt["system_prompt"],
        template=prompt["prompt_template"],
        reference=reference,
        user=user,
        **meta,
    )
    request = ChatRequest(prompt["system_prompt"], user, prompt.get("response_schema"))
    return JudgeItem(key, request, prompt["output_format"])


def build_plan(
    questions: list[dict[str, Any]],
    answers: dict[str, dict[int, list[str]]],
    prompts: dict[str, dict[str, Any]],
    references: dict[int, list[str]],
    *,
    judge_model: str,
    modes: list[str],
    pairwise: str = "all",
    baseline: str | None = None,
    settings: dict[str, Any] | None = None,
    skipped: Counter | None = None,
) -> Plan:
    """All judge calls for `modes` (single, pairwise) over questions x turns x competitors."""
    plan = Plan(skipped=skipped if skipped is not None else Counter())
    models = list(answers)
    pair_list = pairs_of(models, pairwise, baseline) if "pairwise" in modes else []

    def item(prompt: dict[str, Any], user: str, ref: list[str] | None, **meta: Any) -> JudgeItem:
        it = make_item(prompt, user, ref, judge_model, settings or {}, **meta)
        plan.items.append(it)
        return it

    for q in questions:
        qid, category = int(q["question_id"]), q.get("category", "")
        ref = q.get("reference") or references.get(qid) if needs_reference(category) else None
        if needs_reference(category) and not ref:
            plan.skipped[f"no reference answer ({category})"] += len(q["turns"]) * len(models)
            continue
        for turn in (1, 2)[: len(q["turns"])]:
            names = prompt_names(category, turn)
            if "single" in modes:
                template = prompts[names.single]
                for model in models:
                    turns = answers[model].get(qid)
                    if turns is None or len(turns) < turn:
                        plan.skipped[f"missing answer ({model})"] += 1
                        continue
                    user = single_user_prompt(template, q, turns, turn, ref)
                    it = item(template, user, ref, question_id=qid, turn=turn, kind="single")
                    plan.singles.append(
                        {
                            "question_id": qid,
                            "model": model,
                            "judge": [judge_model, template["name"]],
                            "user_prompt": user,
                            "turn": turn,
                            "category": category,
                            "answer_len": sum(len(t) for t in turns[:turn]),
                            "_key": it.key,
                        }
                    )
            template = prompts[names.pair]
            for m1, m2 in pair_list:
                a1, a2 = answers[m1].get(qid), answers[m2].get(qid)
                if a1 is None or a2 is None or len(a1) < turn or len(a2) < turn:
                    plan.skipped[f"missing answer ({m1} vs {m2})"] += 1
                    continue
                u1 = pair_user_prompt(template, q, a1, a2, turn, ref)
                u2 = pair_user_prompt(template, q, a2, a1, turn, ref)
                g1 = item(template, u1, ref, question_id=qid, turn=turn, kind="pair")
                g2 = item(template, u2, ref, question_id=qid, turn=turn, kind="pair")
                plan.pairs.append(
                    {
                        "question_id": qid,
                        "model_1": m1,
                        "model_2": m2,
                        "judge": [judge_model, template["name"]],
                        "g1_user_prompt": u1,
                        "g2_user_prompt": u2,
                        "turn": turn,
                        "category": category,
                        "_keys": (g1.key, g2.key),
                    }
                )
    return plan


def _provenance(result: ItemResult) -> dict[str, Any]:
    out: dict[str, Any] = {"verdict_source": result.verdict.source, "cached": result.cached}
    out["attempts"] = result.attempts  # requests sent for it in this run (0: cached or not made)
    if result.error:
        out["error"] = result.error
    elif result.verdict.error:
        out["parse_error"] = result.verdict.error  # why the text held no verdict
    return out


def single_records(plan: Plan, results: dict[str, ItemResult]) -> list[dict[str, Any]]:
    """FastChat single judgments; an unparsed or failed verdict has score -1 (as in FastChat)."""
    out = []
    for skeleton in plan.singles:
        row = {k: v for k, v in skeleton.items() if k != "_key"}
        r = results[skeleton["_key"]]
        score = r.verdict.score
        row.update(
            judgment=r.judgment if not r.error else f"$ERROR$ {r.error}",
            score=score if score is not None else -1,
            tstamp=time.time(),
            **_provenance(r),
        )
        if r.verdict.expected_score is not None:
            row["expected_score"] = r.verdict.expected_score
            row["probs"] = r.verdict.probs
        out.append(row)
    return out


def pair_records(plan: Plan, results: dict[str, ItemResult]) -> list[dict[str, Any]]:
    """FastChat pairwise judgments: g1 shows model_1 as A, g2 shows model_2 as A."""
    out = []
    for skeleton in plan.pairs:
        row = {k: v for k, v in skeleton.items() if k != "_keys"}
        for g, key, mapping in zip(("g1", "g2"), skeleton["_keys"], PAIR_MAPS, strict=True):
            r = results[key]
            winner = r.verdict.winner
            row[f"{g}_winner"] = mapping.get(winner, winner) if winner else "error"
            row[f"{g}_judgment"] = r.judgment if not r.error else f"$ERROR$ {r.error}"
            for k, v in _provenance(r).items():
                row[f"{g}_{k}"] = v
            if r.verdict.probs is not None:  # A / B / C as the judge saw them in this order
                row[f"{g}_probs"] = r.verdict.probs
        row["tstamp"] = time.time()
        out.append(row)
    return out
