"""Battles in FastChat's columns, from MT-bench pairwise judgments and from external battle files.

A pairwise judgment holds two games: g1 with the answers in order (model_1 as A) and g2 with
them swapped, both already mapped back to "model_1" / "model_2" / "tie" (FastChat's
`play_a_match_pair`). The swap rule (FastChat's `show_result.py`): the battle goes to a model only
when both games name it; a tie in g1 or games that disagree make a tie, which is how a judge's
position bias turns into a tie instead of a win. A game the judge failed ("error", or a verdict
that is missing) leaves nothing to compare, so that judgment is counted as invalid, not scored.

Every battle carries `source` (who voted: "judge" for an LLM judge, "human" for a person) and
`origin` (where it was read: "mt_bench", "arena" for the vote store, or an external file's URI),
and, where both answers are known, FastChat's `conv_metadata` (the answers' style counts, for
style control): an MT-bench battle of turn t counts the turns the judge saw (1..t), an arena vote
its conversations' assistant turns, an external row keeps its own.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from arenaflow import io
from arenaflow.answer_style import answer_style, conv_metadata, has_style
from arenaflow.rating.counts import WINNERS

log = logging.getLogger(__name__)

GAME_WINNERS = ("model_1", "model_2", "tie")
PAIR_FIELDS = ("question_id", "model_1", "model_2", "g1_winner", "g2_winner")
KEEP_FIELDS = ("question_id", "turn", "tstamp", "judge", "language", "anony", "category")
# The judge's A/B/C probabilities of each order, where its backend returned them.
PROB_FIELDS = ("g1_probs", "g2_probs")
SOURCES = ("judge", "human")
# FastChat's `judge` field of human votes: Chatbot Arena users, MT-bench experts and authors
HUMAN_JUDGE_PREFIXES = ("arena_user", "expert", "author", "human")


def battle_source(row: dict[str, Any]) -> str:
    """Who cast an external battle's vote: an explicit `source` ("judge" / "human") wins; else an
    LLM judge is named by FastChat's `judge` field ([model, prompt] or a name that is not a person's,
    e.g. "gpt4_pair"); rows without a judge are Chatbot Arena exports, human votes."""
    source = row.get("source")
    if source in SOURCES:
        return source
    judge = row.get("judge")
    if isinstance(judge, list | tuple) and judge:
        return "judge"
    if isinstance(judge, str) and judge:
        return "human" if judge.lower().startswith(HUMAN_JUDGE_PREFIXES) else "judge"
    return "human"


def swap_rule(g1: str, g2: str) -> str:
    """The battle winner of a judgment's two games: "model_a" | "model_b" | "tie"."""
    if g1 == "tie" or g1 != g2:
        return "tie"
    return "model_a" if g1 == "model_1" else "model_b"


def expected_first(probs: Any, shown_as: str) -> float | None:
    """Expected score of the answer a judge saw as `shown_as` (A or B): P(it wins) + P(tie) / 2."""
    if not isinstance(probs, dict):
        return None
    try:
        p = {k: float(probs.get(k, 0.0)) for k in ("A", "B", "C")}
    except (TypeError, ValueError):
        return None
    total = sum(p.values())
    if not (total > 0 and all(v >= 0 for v in p.values())):
        return None
    return (p[shown_as] + 0.5 * p["C"]) / total


def soft_score(row: dict[str, Any]) -> float | None:
    """model_1's expected score over both orders (g1 shows it as A, g2 as B); None unless the
    judge's verdict probabilities of both orders are there."""
    a, b = expected_first(row.get("g1_probs"), "A"), expected_first(row.get("g2_probs"), "B")
    return None if a is None or b is None else (a + b) / 2


Styles = dict[tuple[str, Any], list[dict[str, Any]]]  # (model, question_id) -> per-turn style


def answer_styles(answers: Iterable[Any], model: str) -> Styles:
    """Per-turn style counts of one model's FastChat answer rows (its `style`, else counted now)."""
    out: Styles = {}
    for row in answers:
        if not isinstance(row, dict) or "question_id" not in row:
            continue
        style = row.get("style")
        if not isinstance(style, list):
            try:
                style = [answer_style(str(t)) for t in row["choices"][0]["turns"]]
            except (KeyError, IndexError, TypeError):
                continue
        out[(model, row["question_id"])] = style
    return out


def _pair_metadata(styles: Styles, a: str, b: str, qid: Any, turn: Any) -> dict[str, Any] | None:
    sa, sb = styles.get((a, qid)), styles.get((b, qid))
    if sa is None or sb is None:
        return None
    t = int(turn) if isinstance(turn, int) and turn >= 1 else 1
    return conv_metadata(sa[:t], sb[:t])


def _conversation_metadata(row: dict[str, Any]) -> dict[str, Any] | None:
    """A battle row's own conv_metadata, else one counted from its two conversations."""
    meta = row.get("conv_metadata")
    if has_style(meta):
        return meta
    sides = []
    for key in ("conversation_a", "conversation_b"):
        conv = row.get(key)
        if not isinstance(conv, list):
            return None
        sides.append(
            [
                answer_style(str(m.get("content") or ""))
                for m in conv
                if isinstance(m, dict) and m.get("role") == "assistant"
            ]
        )
    return conv_metadata(sides[0], sides[1])


def battles_from_pairwise(
    judgments: Iterable[Any], counts: Counter[str] | None = None, styles: Styles | None = None
) -> Iterator[dict[str, Any]]:
    """One battle per (question, turn, pair, judge); bad or repeated judgments are counted in
    `counts`; `styles` (see `answer_styles`) adds each battle's conv_metadata."""
    counts = counts if counts is not None else Counter()
    seen: set[tuple] = set()
    for row in judgments:
        if not isinstance(row, dict):
            counts["not_an_object"] += 1
            continue
        missing = [f for f in PAIR_FIELDS if row.get(f) in (None, "")]
        if missing:
            counts[f"missing_{missing[0]}"] += 1
            continue
        g1, g2 = str(row["g1_winner"]), str(row["g2_winner"])
        if "error" in (g1, g2):
            counts["judge_error"] += 1
            continue
        if g1 not in GAME_WINNERS or g2 not in GAME_WINNERS:
            counts["bad_verdict"] += 1
            continue
        a, b = str(row["model_1"]), str(row["model_2"])
        if a == b:
            counts["self_battle"] += 1
            continue
        judge = row.get("judge")
        judge_key = tuple(judge) if isinstance(judge, list) else judge
        key = (row["question_id"], row.get("turn", 1), a, b, judge_key)
        if key in seen:
            counts["duplicate_judgment"] += 1
            continue
        seen.add(key)
        battle = {"model_a": a, "model_b": b, "winner": swap_rule(g1, g2)}
        battle.update({f: row[f] for f in (*KEEP_FIELDS, *PROB_FIELDS) if f in row})
        score = soft_score(row)
        if score is not None:
            battle["score_a"] = score
        meta = _pair_metadata(styles or {}, a, b, row["question_id"], row.get("turn", 1))
        if meta is not None:
            battle["conv_metadata"] = meta
        battle.update({"g1_winner": g1, "g2_winner": g2, "source": "judge", "origin": "mt_bench"})
        counts["valid"] += 1
        yield battle


def read_records(uri: str, counts: Counter[str]) -> Iterator[Any]:
    """Rows of a JSON array or JSONL file at any fsspec URI; unparsable lines are counted."""
    text = io.read_text(uri)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            yield from json.loads(stripped)
            return
        except json.JSONDecodeError:
            counts["bad_json_file"] += 1
            log.warning("%s is not a valid JSON array; reading it line by line", uri)
    for line in text.splitlines():
        line = line.strip().rstrip(",")
        if not line or line in ("[", "]"):
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            counts["bad_json"] += 1


def battles_from_records(
    records: Iterable[Any],
    origin: str,
    counts: Counter[str] | None = None,
    source: str | None = None,
) -> Iterator[dict[str, Any]]:
    """FastChat / Chatbot Arena battle rows (model_a, model_b, winner) from a file or the vote
    store; `source` forces who voted, else `battle_source` tells it per row."""
    counts = counts if counts is not None else Counter()
    for row in records:
        if not isinstance(row, dict):
            counts["not_an_object"] += 1
            continue
        a, b, winner = row.get("model_a"), row.get("model_b"), row.get("winner")
        if not a or not b:
            counts["missing_model"] += 1
            continue
        if winner not in WINNERS:
            counts["bad_winner"] += 1
            continue
        if a == b:
            counts["self_battle"] += 1
            continue
        battle = {"model_a": str(a), "model_b": str(b), "winner": winner}
        battle.update({f: row[f] for f in KEEP_FIELDS if f in row})
        meta = _conversation_metadata(row)
        if meta is not None:
            battle["conv_metadata"] = meta
        battle["source"] = source or battle_source(row)
        battle["origin"] = origin
        counts["valid"] += 1
        yield battle


def order_battles(battles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Battle order for online Elo: by timestamp when every battle has one, else as read."""
    if battles and all(isinstance(b.get("tstamp"), int | float) for b in battles):
        return sorted(battles, key=lambda b: b["tstamp"])
    return battles
