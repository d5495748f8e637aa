"""The OpenAI-compatible judge against a scripted stand-in server on a loopback port: 429s with
Retry-After, 500s, timeouts, slow and malformed replies; the cache; budgets; clear errors; no key leaks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from judge_standin import SENTINEL, StandIn, all_text_under, api_overrides, read_rows, write_inputs

from arenaflow.judge import judge, score
from arenaflow.judge.backends import JudgeConfigError, JudgeUnreachableError

# 2 questions x 2 turns: 2 models single (8 calls) + 1 pair in both orders (8 calls)
CALLS = 16


def test_every_judgment_completes_through_errors_and_a_rerun_pays_nothing(
    stand_in: StandIn,
    make_cfg,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    cfg = make_cfg(*api_overrides(stand_in.url, **{"judge.api_key_env": "OPENAI_API_KEY"}))
    inputs = write_inputs(tmp_path)
    stand_in.script[:] = ["429", "500", "hang", "slow", "malformed", "malformed"]

    first = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])

    counts = first["counts"]
    assert counts["single"] == 8 and counts["pair"] == 4
    assert counts["calls_made"] == CALLS and counts["calls_cached"] == 0
    assert counts["retries"] == 3  # the 429, the 500 and the timed-out request, each retried once
    assert len(stand_in.hits) == CALLS + 3
    assert counts["verdict_text"] == CALLS - 2 and counts["verdict_parse_error"] == 2
    assert first["health"]["parse_failures"] == 2
    assert first["health"]["parse_failure_rate"] == pytest.approx(2 / CALLS)
    singles, pairs = read_rows(first["single_uri"]), read_rows(first["pair_uri"])
    assert first["single_uri"].endswith("model_judgment/stand-in-judge_single.jsonl")
    assert {r["judge"][1] for r in singles} == {
        "single-v1",
        "single-v1-multi-turn",
        "single-math-v1",
        "single-math-v1-multi-turn",
    }
    unparsed = [r for r in singles if r["score"] == -1] + [
        r for r in pairs if "error" in (r["g1_winner"], r["g2_winner"])
    ]
    assert 1 <= len(unparsed) <= 2  # nothing dropped: the unparsed are in the files, marked
    for r in singles:
        assert r["score"] in (-1, 8.0, 3.0)
        assert r["score"] != 8.0 or r["model"] == "finetuned"
    for r in pairs:  # GOOD beats meh in both orders: position-consistent
        assert {r["g1_winner"], r["g2_winner"]} <= {"model_1", "error"}
    assert first["health"]["position_consistency"] == 1.0

    # a re-run pays nothing: the unparsed replies were cached with their text, re-read, and
    # still count as parse failures (not as verdicts)
    hits_before = len(stand_in.hits)
    second = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert second["counts"]["calls_made"] == 0 and second["counts"]["calls_cached"] == CALLS
    assert len(stand_in.hits) == hits_before
    assert second["counts"]["verdict_text"] == CALLS - 2
    assert second["counts"]["verdict_parse_error"] == 2
    assert second["health"]["parse_failures"] == 2
    again = read_rows(second["single_uri"]) + read_rows(second["pair_uri"])
    kept = [r for r in again if "I cannot decide" in str(r)]
    assert 1 <= len(kept) <= 2  # the raw replies, re-read from the cache

    scores = score(cfg, single_uri=second["single_uri"], pair_uri=second["pair_uri"])
    finetuned = scores["scores"]["finetuned"]
    assert finetuned["average"] == 8.0 and {finetuned["turn1"], finetuned["turn2"]} <= {8.0, None}
    assert finetuned["expected"] is None  # logprobs off: no probabilities
    assert scores["scores"]["base"]["average"] == 3.0
    won = scores["pairwise"]["finetuned"]
    assert won["win"] + won["error"] == 4 and won["loss"] == won["tie"] == 0
    assert scores["pairwise"]["base"]["win_rate_adjusted"] == 0.0

    # the key went to the server and nowhere else
    assert stand_in.auth == {f"Bearer {SENTINEL}"}
    assert SENTINEL not in caplog.text
    home = Path(cfg.paths.home)
    assert not [p for p, data in all_text_under(home) if SENTINEL.encode() in data]


def test_budget_stops_cleanly_and_resume_continues(
    stand_in: StandIn, make_cfg, tmp_path: Path
) -> None:
    inputs = write_inputs(tmp_path)
    cfg = make_cfg(*api_overrides(stand_in.url, **{"judge.max_calls": 5}))
    partial = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert partial["counts"]["calls_made"] == 5
    assert partial["counts"]["verdict_budget"] == CALLS - 5
    assert "judge.max_calls=5 reached" in partial["budget_message"]
    assert "Raise the budget and re-run" in partial["budget_message"]
    rows = read_rows(partial["single_uri"]) + read_rows(partial["pair_uri"])
    assert any("budget" in str(r.get("error", r.get("g1_error", ""))) for r in rows)

    cfg = make_cfg(*api_overrides(stand_in.url))
    resumed = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert resumed["counts"]["calls_cached"] == 5
    assert resumed["counts"]["calls_made"] == CALLS - 5
    assert len(stand_in.hits) == CALLS


def test_logprob_recovery_over_http(stand_in: StandIn, make_cfg, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path, question_ids=(81,))
    cfg = make_cfg(
        *api_overrides(stand_in.url, **{"judge.logprob_recovery": True, "judge.concurrency": 1})
    )
    stand_in.script[:] = ["malformed"] * 16  # every reply without logprobs lacks a verdict
    result = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert result["counts"]["verdict_logprobs"] == 8
    assert result["health"]["parse_failures"] == 8 and result["health"]["unresolved"] == 0
    assert sum(1 for h in stand_in.hits if h["followup"]) == 8
    assert all(h["logprobs"] for h in stand_in.hits)  # the main calls ask for them too
    singles = read_rows(result["single_uri"])
    assert {r["verdict_source"] for r in singles} == {"logprobs"}
    assert {r["score"] for r in singles} == {6.0}
    assert singles[0]["expected_score"] == pytest.approx(6 * 0.8 + 7 * 0.2)
    pair = read_rows(result["pair_uri"])[0]
    assert (pair["g1_winner"], pair["g2_winner"]) == ("model_2", "model_1")  # "B" both times


def test_missing_key_names_the_variable(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = make_cfg("judge=gpt4")
    from arenaflow.judge.backends import build_backend

    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):
        build_backend(cfg)


def test_unreachable_judge_names_the_url(make_cfg, tmp_path: Path) -> None:
    from judge_standin import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    inputs = write_inputs(tmp_path, question_ids=(81,))
    cfg = make_cfg(*api_overrides(url, **{"judge.retries": 1}))
    with pytest.raises(JudgeUnreachableError, match=url.replace(".", r"\.")):
        judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])


def test_verdict_probabilities_ride_on_the_reply(stand_in: StandIn, make_cfg, tmp_path) -> None:
    """With logprobs on, the verdict token's alternatives give the expected rating and the
    verdict probabilities beside the argmax verdict, without another call."""
    inputs = write_inputs(tmp_path, question_ids=(81,))
    cfg = make_cfg(*api_overrides(stand_in.url, **{"judge.logprob_recovery": True}))
    result = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert result["counts"]["calls_made"] == 8 and not any(h["followup"] for h in stand_in.hits)
    singles = {r["model"]: r for r in read_rows(result["single_uri"]) if r["turn"] == 1}
    assert singles["finetuned"]["score"] == 8.0 and singles["finetuned"]["verdict_source"] == "text"
    assert singles["finetuned"]["expected_score"] == pytest.approx(8 * 0.7 + 7 * 0.2 + 9 * 0.1)
    assert singles["finetuned"]["probs"] == pytest.approx({"7": 0.2, "8": 0.7, "9": 0.1})
    pair = read_rows(result["pair_uri"])[0]
    assert (pair["g1_winner"], pair["g2_winner"]) == ("model_1", "model_1")
    assert pair["g1_probs"] == pytest.approx({"A": 0.8, "B": 0.15, "C": 0.05})
    assert pair["g2_probs"] == pytest.approx({"A": 0.15, "B": 0.8, "C": 0.05})


def test_retry_after_is_capped_and_attempts_are_exact(
    stand_in: StandIn, make_cfg, tmp_path: Path
) -> None:
    """A server that asks to wait a day (or forever) waits judge.backoff_max; a 4xx that is not
    retried counts one attempt, not retries + 1."""
    import time

    inputs = write_inputs(tmp_path, question_ids=(81,))
    cfg = make_cfg(
        *api_overrides(stand_in.url, **{"judge.backoff_max": 0.05, "judge.concurrency": 1})
    )
    stand_in.script[:] = ["429-day", "429-inf", "400"]
    t0 = time.perf_counter()
    out = judge(cfg, question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    assert time.perf_counter() - t0 < 30
    # the first call retried twice (day, inf) and then answered; the 400 was not retried
    assert out["counts"]["retries"] == 2
    assert out["counts"]["verdict_error"] == 1 and out["counts"]["verdict_text"] == 7
    errors = [r for r in read_rows(out["single_uri"]) if r.get("error")]
    errors += [r for r in read_rows(out["pair_uri"]) if r.get("g1_error") or r.get("g2_error")]
    assert len(errors) == 1 and "400" in str(errors[0])


def test_the_cache_key_follows_the_endpoint(stand_in: StandIn, make_cfg, tmp_path: Path) -> None:
    """The same judge.model behind another base_url is another judge: nothing is reused."""
    from judge_standin import start_stand_in

    other, server, thread = start_stand_in()
    try:
        inputs = write_inputs(tmp_path, question_ids=(81,))
        args = dict(question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
        first = judge(make_cfg(*api_overrides(stand_in.url)), **args)
        again = judge(make_cfg(*api_overrides(stand_in.url)), **args)
        moved = judge(make_cfg(*api_overrides(other.url)), **args)
        assert first["counts"]["calls_made"] == 8 and again["counts"]["calls_made"] == 0
        assert moved["counts"]["calls_made"] == 8 and len(other.hits) == 8
    finally:
        server.should_exit = True
        thread.join(timeout=5)
