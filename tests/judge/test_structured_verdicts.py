"""Structured verdicts (`judge.structured=true`): the prompts ask for a JSON verdict, the endpoint
judge sends its schema as `response_format`, the local judge decodes under the schema's grammar,
and a verdict that does not validate is a parse failure with its reason."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from judge_standin import GOOD, StandIn, api_overrides, read_rows, section, write_inputs

from arenaflow.judge import judge
from arenaflow.judge.prompts import load_judge_prompts, single_user_prompt, structured_prompts
from arenaflow.judge.tables import judgments_metadata
from arenaflow.judge.verdicts import parse_verdict, verdict_schema, with_token_probabilities

CALLS = 16  # 2 questions x 2 turns: 2 models single (8 calls) + 1 pair in both orders (8 calls)


@pytest.mark.parametrize(
    ("reply", "output_format", "expected", "error"),
    [
        ('{"score": 7}', "[[rating]]", 7.0, None),
        ('Sure:\n```json\n{"score": 3}\n```', "[[rating]]", 3.0, None),
        ('{"winner": "tie"}', "[[A]]", "tie", None),
        ('{"score": 11}', "[[rating]]", None, "score: Input should be less than or equal to 10"),
        ('{"score": 0}', "[[rating]]", None, "score: Input should be greater than or equal to 1"),
        ('{"winner": "C"}', "[[A]]", None, "winner: Input should be 'A', 'B' or 'tie'"),
        ('{"score": 5, "why": "ok"}', "[[rating]]", None, "why: Extra inputs are not permitted"),
        ('{"rating": 5}', "[[rating]]", None, "score: Field required"),
        ("Rating: [[5]]", "[[rating]]", None, "not JSON"),
        ('{"score": 5', "[[rating]]", None, "not JSON"),
    ],
)
def test_a_json_verdict_is_validated_against_its_schema(
    reply: str, output_format: str, expected: Any, error: str | None
) -> None:
    verdict = parse_verdict(reply, output_format, structured=True)
    got = verdict.score if output_format == "[[rating]]" else verdict.winner
    assert got == expected and verdict.error == error
    assert verdict.source == ("text" if expected is not None else "none")


def test_the_json_verdict_token_gives_the_verdict_probabilities() -> None:
    """As with `[[7]]`, the alternatives of the verdict token inside the JSON give the verdict
    probabilities and the expected rating; the argmax from the text stays the verdict."""

    def tokens(*parts: str, at: str, top: dict[str, float]) -> list:
        return [(p, {t: math.log(q) for t, q in top.items()} if p == at else {}) for p in parts]

    score = parse_verdict('{"score": 7}', "[[rating]]", structured=True)
    reply = tokens('{"', "score", '":', " ", "7", "}", at="7", top={"7": 0.6, "8": 0.4})
    read = with_token_probabilities(score, reply, "[[rating]]", structured=True)
    assert read.score == 7.0 and read.expected_score == pytest.approx(7.4)
    winner = parse_verdict('{"winner": "tie"}', "[[A]]", structured=True)
    top = {"tie": 0.5, "t": 0.1, "A": 0.3, "B": 0.1}  # `t` begins "tie" as well
    reply = tokens('{"', "winner", '":', ' "', "tie", '"}', at="tie", top=top)
    read = with_token_probabilities(winner, reply, "[[A]]", structured=True)
    assert read.winner == "tie" and read.probs == pytest.approx({"A": 0.3, "B": 0.1, "C": 0.6})


def test_every_prompt_asks_for_the_json_verdict_and_carries_its_schema() -> None:
    plain = load_judge_prompts()
    structured = structured_prompts(plain)
    assert set(structured) == set(plain)
    question = {"turns": ["What is 2+2?", "And 3+3?"]}
    for name, p in structured.items():
        text = p["system_prompt"] + p["prompt_template"]
        fmt = "[[rating]]" if p["output_format"] == "[[rating]]" else "[[A]]"
        assert p["response_schema"] == verdict_schema(fmt)
        assert "[[" not in text and "explanation" not in text, name
        assert ('{"score"' if fmt == "[[rating]]" else '{"winner": "tie"}') in text.replace(
            "{{", "{"
        )
        assert plain[name]["system_prompt"] != p["system_prompt"] or (
            plain[name]["prompt_template"] != p["prompt_template"]
        )
    single = structured["single-v1"]
    user = single_user_prompt(single, question, ["4"], 1, None)  # braces survive str.format
    assert 'in this format: {"score": <rating>}, for example: {"score": 5}.' in user


def json_judge(seen: list[dict[str, Any]], bad_scores: bool = False):
    """A stand-in judge that answers in JSON when asked for it (the reference and GOOD win), and
    records what each request asked for; `bad_scores`: single gradings out of the schema's range."""

    def reply(body: dict[str, Any]) -> str:
        seen.append(body)
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if '{"winner"' in system:
            a = section(user, "Assistant A's Answer") or user.split("Assistant B")[0]
            return json.dumps({"winner": "A" if GOOD in a else "B"})
        return json.dumps({"score": (11 if bad_scores else 8) if GOOD in user else 3})

    return reply


def test_the_endpoint_judge_sends_the_schema_and_reads_the_json_verdict(
    stand_in: StandIn, make_cfg, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []
    stand_in.policy = json_judge(seen)
    inputs = write_inputs(tmp_path)
    kwargs = dict(question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    plain = judge(make_cfg(*api_overrides(stand_in.url)), **kwargs)
    assert plain["counts"]["calls_made"] == CALLS
    assert not any("response_format" in body for body in seen)
    seen.clear()

    out = judge(make_cfg(*api_overrides(stand_in.url, **{"judge.structured": True})), **kwargs)

    # a structured verdict is another request: nothing comes from the unstructured cache
    assert out["counts"]["calls_made"] == CALLS and out["counts"]["calls_cached"] == 0
    assert len(seen) == CALLS
    for body in seen:
        pairwise = '{"winner"' in body["messages"][0]["content"]
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"] == verdict_schema("[[A]]" if pairwise else "[[rating]]")
    assert out["counts"]["verdict_text"] == CALLS and out["health"]["parse_failures"] == 0
    singles, pairs = read_rows(out["single_uri"]), read_rows(out["pair_uri"])
    assert {(r["model"], r["score"]) for r in singles} == {("finetuned", 8.0), ("base", 3.0)}
    assert all(r["g1_winner"] == r["g2_winner"] == "model_1" for r in pairs)
    assert out["parse_errors"] == {}


def test_a_verdict_that_does_not_validate_is_a_parse_failure_with_its_reason(
    stand_in: StandIn, make_cfg, tmp_path: Path
) -> None:
    stand_in.policy = json_judge([], bad_scores=True)
    inputs = write_inputs(tmp_path)
    cfg = make_cfg(*api_overrides(stand_in.url, **{"judge.structured": True}))

    out = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])

    reason = "score: Input should be less than or equal to 10"
    assert out["counts"]["verdict_parse_error"] == 4  # finetuned's 4 single gradings: score 11
    assert out["parse_errors"] == {reason: 4}
    assert out["health"]["parse_failures"] == 4
    failed = [r for r in read_rows(out["single_uri"]) if r["score"] == -1]
    assert len(failed) == 4 and all(r["model"] == "finetuned" for r in failed)
    assert all(r["parse_error"] == reason and r["verdict_source"] == "none" for r in failed)
    shown = judgments_metadata(out)["parse_failures"]  # what the Dagster asset shows
    assert shown.rows == [{"reason": reason, "count": 4}]
    again = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert again["counts"]["calls_made"] == 0 and again["parse_errors"] == {reason: 4}


def test_a_server_without_structured_outputs_is_told_how_to_fix_it(
    stand_in: StandIn, make_cfg, tmp_path: Path
) -> None:
    stand_in.script[:] = ["400"] * CALLS
    inputs = write_inputs(tmp_path)
    cfg = make_cfg(*api_overrides(stand_in.url, **{"judge.structured": True}))
    out = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert out["counts"]["verdict_error"] == CALLS
    row = read_rows(out["single_uri"])[0]
    assert "400" in row["error"] and "set judge.structured=false" in row["error"]


def test_the_local_judge_on_a_random_model_always_parses_when_structured(
    make_cfg, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A random model writes no `[[rating]]`; under the schema's grammar it writes a verdict
    every time (no logprob recovery, so the text alone counts)."""
    inputs = write_inputs(tmp_path, question_ids=(81,))
    kwargs = dict(
        question_uri=inputs["question_uri"],
        answer_uris=inputs["answer_uris"],
        base_model_path=tiny_model_dir,
    )
    overrides = (
        "judge.model=base",
        "judge.model_name=tiny-judge",
        "judge.logprob_recovery=false",
        "judge.calibration.per_category=0",  # long reference prompts: seconds of prefill each
    )
    text = judge(make_cfg(*overrides), **kwargs)
    assert text["health"]["parse_failures"] == text["health"]["replies"] == 8

    out = judge(make_cfg(*overrides, "judge.structured=true"), **kwargs)

    assert out["health"]["replies"] == 8 and out["health"]["parse_failures"] == 0
    assert out["counts"]["verdict_text"] == 8 and out["parse_errors"] == {}
    singles, pairs = read_rows(out["single_uri"]), read_rows(out["pair_uri"])
    for r in singles:  # the engine's logprobs are those of the masked distribution
        assert r["verdict_source"] == "text" and 1 <= r["score"] <= 10
        assert r["score"] == json.loads(r["judgment"])["score"]
        assert set(r["probs"]) <= {str(i) for i in range(1, 10)} and 1 <= r["expected_score"] <= 9
    for r in pairs:
        assert {r["g1_winner"], r["g2_winner"]} <= {"model_1", "model_2", "tie"}
        for g in ("g1", "g2"):
            assert set(r[f"{g}_probs"]) <= {"A", "B", "C"}
            assert sum(r[f"{g}_probs"].values()) == pytest.approx(1.0)
