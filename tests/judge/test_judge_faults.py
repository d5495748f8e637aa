"""Fault injection against the stand-in judge at judge.concurrency=8: a seeded 30% of requests meet
429s (with and without Retry-After), 500s, 503s, timeouts, cut-off JSON bodies and verdict-less
text; the first run is killed (SIGKILL) mid-run, a second runs out of budget, a third finishes.
Across the three runs no judgment is lost, none is paid twice, every request is reported, and no
budget is exceeded."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from judge_standin import FAULTS, Faults, StandIn, api_overrides, read_rows, write_inputs

from arenaflow.judge import judge

# 2 questions x 2 turns: 2 models single (8 calls) + 1 pair in both orders (8 calls)
CALLS = 16

CHILD = """
import json, sys
from arenaflow.config import compose_config
from arenaflow.judge import judge
args = json.loads(sys.argv[1])
judge(compose_config(args["overrides"]), question_uri=args["question"], answer_uris=args["answers"])
"""


def fault_overrides(url: str, **extra: Any) -> list[str]:
    return api_overrides(
        url,
        **{
            "judge.concurrency": 8,
            "judge.logprob_recovery": True,
            "judge.max_tokens": 16,
            "judge.retries": 6,  # 0.3**7: no prompt fails every attempt
            "judge.timeout": 1.5,
            "judge.backoff_base": 0.005,
            "judge.backoff_max": 0.02,
            **extra,
        },
    )


def cached(path: Path) -> tuple[int, int]:
    """(rows, rows whose logprob recovery answered) in the judgment cache, read alongside a run."""
    if not path.exists():
        return 0, 0
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        try:
            values = [json.loads(v) for (v,) in db.execute("SELECT value FROM judgments")]
        except sqlite3.OperationalError:  # the table is not there yet
            return 0, 0
    return len(values), sum(bool(v.get("recovered")) for v in values)


def delivered(stand_in: StandIn) -> tuple[int, int]:
    """(main replies, verdict-only follow-ups) the stand-in delivered: what was billed."""
    main = sum(1 for (_, followup), n in stand_in.completions.items() if n and not followup)
    return main, sum(1 for (_, followup), n in stand_in.completions.items() if n and followup)


def kill_mid_run(stand_in: StandIn, overrides: list[str], inputs: dict, cache: Path) -> None:
    """Run the judge stage in a subprocess; once some replies were delivered, new requests are
    held unanswered, and when every delivered reply is in the cache the process is SIGKILLed
    with requests in flight."""
    stand_in.hold_after = 5
    args = {"overrides": overrides, "question": inputs["question_uri"]}
    args["answers"] = inputs["answer_uris"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ARENAFLOW_OVERRIDES", None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env)
    try:
        deadline, ready = time.monotonic() + 60, 0
        while time.monotonic() < deadline and proc.poll() is None:
            quiet = stand_in.held >= 1 and stand_in.active == stand_in.held
            ready = ready + 1 if quiet and cached(cache) == delivered(stand_in) else 0
            if ready >= 5:  # steady for 5 polls: nothing left in flight but the held requests
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before it could be killed"
        assert ready >= 5, (
            f"replies delivered {delivered(stand_in)} never all reached the cache "
            f"{cached(cache)} while other requests were in flight"
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while stand_in.active and time.monotonic() < deadline:  # held requests see the kill
        time.sleep(0.02)
    stand_in.hold_after = None


def prompts_of(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], str]]:
    """(user prompt, record, field prefix) for every judge call behind the judgment records."""
    out = []
    for r in rows:
        if "user_prompt" in r:
            out.append((r["user_prompt"], r, ""))
        else:
            out += [(r["g1_user_prompt"], r, "g1_"), (r["g2_user_prompt"], r, "g2_")]
    return out


def check_run(out: dict[str, Any], stand_in: StandIn, before: Counter) -> list[tuple]:
    """Every request the stand-in saw in this run is reported, per judgment and in total."""
    sent = stand_in.requests - before
    assert out["counts"]["requests"] == sent.total()
    calls = prompts_of(read_rows(out["single_uri"]) + read_rows(out["pair_uri"]))
    assert len(calls) == CALLS  # every judgment has its record: none dropped
    for user, row, g in calls:
        assert row[f"{g}attempts"] == sent[(user, False)] + sent[(user, True)]
    return calls


def test_faults_kill_and_budget_lose_nothing_and_pay_nothing_twice(
    stand_in: StandIn, make_cfg, af_home: Path, model_cache: Path, tmp_path: Path
) -> None:
    inputs = write_inputs(tmp_path)
    args = dict(question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    stand_in.faults = Faults(seed=20, rate=0.3)
    stand_in.script[:] = list(FAULTS)  # each kind at least once, then the seeded 30%
    cfg = make_cfg(*fault_overrides(stand_in.url))
    cache = Path(cfg.judge.cache_path)
    base = ["experiment=test", f"paths.home={af_home}", f"paths.cache_dir={model_cache}"]

    # 1. killed mid-run, with requests in flight
    kill_mid_run(stand_in, base + fault_overrides(stand_in.url), inputs, cache)
    first_rows, _ = cached(cache)
    assert 0 < first_rows < CALLS

    # 2. a budget of 6 requests at concurrency 8, retries and recoveries included
    before = Counter(stand_in.requests)
    budgeted = judge(make_cfg(*fault_overrides(stand_in.url, **{"judge.max_calls": 6})), **args)
    assert (stand_in.requests - before).total() == budgeted["counts"]["requests"] <= 6
    check_run(budgeted, stand_in, before)
    assert budgeted["counts"]["calls_cached"] == first_rows
    assert budgeted["counts"]["verdict_budget"] > 0
    assert "judge.max_calls=6 reached" in budgeted["budget_message"]
    outcomes = {k: v for k, v in budgeted["counts"].items() if k.startswith("verdict_")}
    assert sum(outcomes.values()) == CALLS  # each judgment judged, unparsed, or not made: why

    # 3. the rest, without a budget
    before = Counter(stand_in.requests)
    final = judge(cfg, **args)
    calls = check_run(final, stand_in, before)
    counts = final["counts"]
    assert counts.get("verdict_error", 0) == counts.get("verdict_budget", 0) == 0  # none lost
    assert (
        counts.get("verdict_text", 0)
        + counts.get("verdict_logprobs", 0)
        + counts.get("verdict_parse_error", 0)
        == CALLS
    )
    for user, row, g in calls:  # a parse failure is a reply that held no verdict, and stays one
        source = row[f"{g}verdict_source"]
        assert source != "none" or {(user, False), (user, True)} <= stand_in.verdictless

    # no prompt was billed twice across the three runs, and every judgment was billed once
    assert max(stand_in.completions.values()) == 1
    assert {user for user, _, _ in calls} == {u for (u, f) in stand_in.completions if not f}
    faulty = sum(1 for h in stand_in.hits if h["action"] != "ok")
    assert 0.2 < (faulty - len(FAULTS)) / (len(stand_in.hits) - len(FAULTS)) < 0.45


def test_token_budget_holds_at_concurrency(stand_in: StandIn, make_cfg, tmp_path: Path) -> None:
    """Each request holds an upper bound on its tokens while in flight: eight concurrent calls
    cannot spend past judge.max_tokens_budget, and what is left is reported as not judged."""
    inputs = write_inputs(tmp_path)
    overrides = {"judge.concurrency": 8, "judge.max_tokens": 16, "judge.max_tokens_budget": 1500}
    out = judge(
        make_cfg(*api_overrides(stand_in.url, **overrides)),
        question_uri=inputs["question_uri"],
        answer_uris=inputs["answer_uris"],
    )
    assert 0 < stand_in.tokens <= 1500  # what the server billed
    assert out["counts"]["prompt_tokens"] + out["counts"]["completion_tokens"] == stand_in.tokens
    assert out["counts"]["requests"] == len(stand_in.hits)
    assert out["counts"]["verdict_budget"] == CALLS - len(stand_in.hits) > 0
    assert "judge.max_tokens_budget=1500 reached" in out["budget_message"]


def test_a_failing_call_keeps_its_neighbours_replies(
    stand_in: StandIn, make_cfg, tmp_path: Path
) -> None:
    """A 401 in a concurrent chunk stops the run, but the chunk's other replies, already paid
    for, are cached: the rerun asks only for what was never answered."""
    from arenaflow.judge.backends import JudgeConfigError

    inputs = write_inputs(tmp_path, question_ids=(81,))
    args = dict(question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    cfg = make_cfg(*api_overrides(stand_in.url, **{"judge.concurrency": 4}))
    stand_in.script[:] = ["slow", "slow", "401"]  # the other two answer at once
    with pytest.raises(JudgeConfigError, match="401"):
        judge(cfg, **args)
    assert cached(Path(cfg.judge.cache_path)) == (3, 0) and delivered(stand_in) == (3, 0)
    again = judge(cfg, **args)
    assert again["counts"]["calls_cached"] == 3 and again["counts"]["calls_made"] == 5
    assert max(stand_in.completions.values()) == 1


def test_an_unparsed_reply_is_read_again_not_paid_again(
    stand_in: StandIn, make_cfg, tmp_path: Path
) -> None:
    """A reply without a verdict is cached with its text: a rerun with logprob recovery on asks
    only the verdict-only follow-up, never the judgment again."""
    inputs = write_inputs(tmp_path, question_ids=(81,))
    args = dict(question_uri=inputs["question_uri"], answer_uris=inputs["answer_uris"])
    stand_in.script[:] = ["malformed", "malformed"]
    plain = judge(make_cfg(*api_overrides(stand_in.url, **{"judge.concurrency": 1})), **args)
    assert plain["counts"]["verdict_parse_error"] == 2 and len(stand_in.hits) == 8
    on = {"judge.concurrency": 1, "judge.logprob_recovery": True}
    recovered = judge(make_cfg(*api_overrides(stand_in.url, **on)), **args)
    assert recovered["counts"]["calls_cached"] == 8
    assert [h["followup"] for h in stand_in.hits[8:]] == [True, True]
    assert recovered["counts"]["verdict_logprobs"] == 2
    assert recovered["counts"]["verdict_text"] == 6
    assert max(stand_in.completions.values()) == 1
