"""Verdict parsing against JSON test cases: well-formed verdicts, FastChat's backup forms, garbage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arenaflow.judge.verdicts import (
    parse_pair,
    parse_rating,
    parse_verdict,
    verdict_from_logprobs,
)

CASES = Path(__file__).parent / "cases"


def load(name: str) -> list[dict]:
    return json.loads((CASES / name).read_text())


@pytest.mark.parametrize("case", load("single.json"), ids=lambda c: c["name"])
def test_parse_rating(case: dict) -> None:
    assert parse_rating(case["judgment"]) == case["expected"]
    verdict = parse_verdict(case["judgment"], "[[rating]]")
    assert verdict.parsed == (case["expected"] is not None)
    assert verdict.source == ("text" if case["expected"] is not None else "none")


@pytest.mark.parametrize("case", load("pair.json"), ids=lambda c: c["name"])
def test_parse_pair(case: dict) -> None:
    assert parse_pair(case["judgment"], case["format"]) == case["expected"]
    assert parse_verdict(case["judgment"], case["format"]).winner == case["expected"]


@pytest.mark.parametrize("case", load("logprobs.json"), ids=lambda c: c["name"])
def test_verdict_from_logprobs(case: dict) -> None:
    verdict = verdict_from_logprobs(case["top"], case["format"])
    got = verdict.score if case["format"] == "[[rating]]" else verdict.winner
    assert got == case["expected"]
    if case["expected"] is None:
        assert verdict.source == "none" and not verdict.parsed
        return
    assert verdict.source == "logprobs"
    assert sum(verdict.probs.values()) == pytest.approx(1.0)
    if "expected_score" in case:
        assert verdict.expected_score == pytest.approx(case["expected_score"], abs=1e-6)


def test_a_cached_reply_is_read_again() -> None:
    """A stored reply is parsed again on the way out of the cache: a verdict the parser of the
    time missed is read now, a logprob reading stays while the text holds none, and a reply that
    still holds none stays a parse failure."""
    from arenaflow.judge.runner import ItemResult

    missed = {"judgment": "Good. Rating: [[7]]", "score": None, "source": "none"}
    read = ItemResult.from_cache(missed, "[[rating]]")
    assert (read.verdict.score, read.verdict.source, read.cached) == (7.0, "text", True)
    by_logprobs = {"judgment": "Hard to say.", "winner": "B", "source": "logprobs"}
    assert ItemResult.from_cache(by_logprobs, "[[A]]").verdict.winner == "B"
    none = ItemResult.from_cache({"judgment": "Hard to say.", "source": "none"}, "[[A]]")
    assert not none.verdict.parsed and none.verdict.source == "none" and not none.recovered
