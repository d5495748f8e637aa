"""Agreement between LLM-judge and human verdicts on the same model pairs (MT-bench paper, §4.2).

The MT-bench paper ("Judging LLM-as-a-judge", Zheng et al. 2023) defines the agreement between
two types of judges as the probability that a randomly selected judge of each type agrees on a
randomly selected item. Here an item is an unordered pair of models, and the two types are the
battles' `source`s, "judge" and "human". For a pair with judge votes J and human votes H:

    agreement(pair) = P(a random vote of J equals a random vote of H)
                    = sum over outcomes o of  (J_o / |J|) * (H_o / |H|)

where a vote's outcome is "the first model of the pair wins", "the second wins" or "tie" (both
tie kinds are one outcome, and the judge's inconsistent swap games are already ties, the paper's
setup S1). The overall agreement is the mean over the pairs that both sources voted on (a random
pair, then a random vote of each source). Setup S2, "without ties", drops every tie vote on both
sides first and skips pairs left without decisive votes on either side.

`pooled_*` is the other reading, FastChat's `compute_agreement.py`: every (judge vote, human
vote) couple on a shared pair counts once, so pairs with many votes weigh more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

OUTCOMES = ("first", "second", "tie")


def _outcome(model_a: str, model_b: str, winner: str) -> tuple[tuple[str, str], str]:
    """The unordered pair (sorted names) and the vote's outcome relative to that order."""
    pair = (model_a, model_b) if model_a <= model_b else (model_b, model_a)
    if winner not in ("model_a", "model_b"):
        return pair, "tie"
    won = model_a if winner == "model_a" else model_b
    return pair, "first" if won == pair[0] else "second"


def _agree(
    j: Mapping[str, int], h: Mapping[str, int], outcomes: tuple[str, ...]
) -> tuple[int, int]:
    """(agreeing vote couples, all vote couples) over the given outcomes."""
    agree = sum(j.get(o, 0) * h.get(o, 0) for o in outcomes)
    total = sum(j.get(o, 0) for o in outcomes) * sum(h.get(o, 0) for o in outcomes)
    return agree, total


def judge_human_agreement(battles: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-pair and overall judge-human agreement, with ties (S1) and without ties (S2).

    `battles` are rows with model_a, model_b, winner and source ("judge" / "human"); other sources
    are ignored. Overall values are None when no pair has votes from both sources.
    """
    counts: dict[tuple[str, str], dict[str, dict[str, int]]] = defaultdict(
        lambda: {"judge": defaultdict(int), "human": defaultdict(int)}
    )
    for b in battles:
        source = b.get("source")
        if source not in ("judge", "human"):
            continue
        pair, outcome = _outcome(str(b["model_a"]), str(b["model_b"]), str(b["winner"]))
        counts[pair][source][outcome] += 1
    pairs = []
    sums = {"with_tie": [0, 0], "without_tie": [0, 0]}
    for (first, second), votes in sorted(counts.items()):
        j, h = votes["judge"], votes["human"]
        if not j or not h:
            continue
        row: dict[str, Any] = {
            "model_a": first,
            "model_b": second,
            "judge_votes": sum(j.values()),
            "human_votes": sum(h.values()),
            "judge_a_b_tie": f"{j['first']}/{j['second']}/{j['tie']}",
            "human_a_b_tie": f"{h['first']}/{h['second']}/{h['tie']}",
        }
        for name, outcomes in (("with_tie", OUTCOMES), ("without_tie", ("first", "second"))):
            agree, total = _agree(j, h, outcomes)
            row[f"agreement_{name}"] = agree / total if total else None
            row[f"couples_{name}"] = total
            sums[name][0] += agree
            sums[name][1] += total
        pairs.append(row)
    out: dict[str, Any] = {"pairs": pairs, "shared_pairs": len(pairs)}
    for name in ("with_tie", "without_tie"):
        values = [r[f"agreement_{name}"] for r in pairs if r[f"agreement_{name}"] is not None]
        out[name] = sum(values) / len(values) if values else None
        out[f"pairs_{name}"] = len(values)
        agree, total = sums[name]
        out[f"pooled_{name}"] = agree / total if total else None
    return out
