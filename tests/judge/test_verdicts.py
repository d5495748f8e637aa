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
