"""Answer generation with the real tiny model and a real local OpenAI-compatible server."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from arenaflow import io
from arenaflow.evaluate import answer_competitor, run
from arenaflow.evaluate.competitors import parse_competitors


def _local(tiny_model_dir: Path) -> str:
    return f"evaluate.competitors=[{{name: tiny, local: '{tiny_model_dir}'}}]"


def test_resume_produces_only_missing_answers(make_cfg, tiny_model_dir: Path) -> None:
    cfg = make_cfg(_local(tiny_model_dir), "evaluate.max_new_tokens=6", "tracking=none")
    first = answer_competitor(cfg, "tiny")
    assert (first["generated"], first["reused"], first["answered"], first["failed"]) == (3, 0, 3, 0)
    assert first["tokens_generated"] > 0 and first["tokens_per_s"] > 0
    rows = list(io.read_jsonl(first["uri"]))
    assert first["uri"].endswith("mt_bench/mt_bench/model_answer/tiny.jsonl")
    assert [r["question_id"] for r in rows] == [81, 111, 121]
    assert all(r["model_id"] == "tiny" and len(r["choices"][0]["turns"]) == 2 for r in rows)
    assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= rows[0].keys()

    again = answer_competitor(cfg, "tiny")
    assert (again["generated"], again["reused"]) == (0, 3)
    assert list(io.read_jsonl(again["uri"])) == rows  # nothing rewritten

    Path(first["uri"]).write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    resumed = answer_competitor(cfg, "tiny")
    assert (resumed["generated"], resumed["reused"]) == (1, 2)
    assert list(io.read_jsonl(resumed["uri"]))[:2] == rows[:2]

    changed = answer_competitor(
        make_cfg(_local(tiny_model_dir), "evaluate.max_new_tokens=4", "tracking=none"), "tiny"
    )
    assert (changed["generated"], changed["stale_regenerated"]) == (3, 3)

    other_engine = make_cfg(  # 8-bit weights (bitsandbytes) answer differently: not reused
        _local(tiny_model_dir),
        "evaluate.max_new_tokens=4",
        "tracking=none",
        "model.quantization=q8_0",
    )
    if importlib.util.find_spec("bitsandbytes") is not None:
        requantized = answer_competitor(other_engine, "tiny")
        assert (requantized["generated"], requantized["stale_regenerated"]) == (3, 3)


def test_openai_compatible_competitor_against_local_server(
    make_cfg, fake_openai, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_OPENAI_KEY", fake_openai.api_key)
    cfg = make_cfg(
        "evaluate.competitors=[{name: remote, openai_compatible: {base_url: '"
        + fake_openai.url
        + "', model: gpt-x, api_key_env: FAKE_OPENAI_KEY}}]",
        "evaluate.backoff_s=0.01",
        "evaluate.retries=3",
    )
    questions = {q["question_id"]: q for q in io.read_jsonl(run_questions(cfg))}
    fake_openai.fail_once.add(questions[81]["turns"][1])  # retried, then answered
    fake_openai.fail_always.add(questions[121]["turns"][0])  # fails every attempt

    out = answer_competitor(cfg, "remote")
    assert (out["answered"], out["failed"]) == (2, 1)
    assert out["failures"][0]["question_id"] == 121 and "503" in out["failures"][0]["error"]
    assert list(io.read_jsonl(out["failures_uri"]))[0]["question_id"] == 121
    rows = {r["question_id"]: r for r in io.read_jsonl(out["uri"])}
    assert rows[81]["choices"][0]["turns"] == [
        "answer to turn 1 (1 messages, t=0.7)",
        "answer to turn 2 (3 messages, t=0.7)",
    ]
    turn2 = [r for r in fake_openai.requests if len(r["messages"]) == 3]
    assert turn2 and all(r["messages"][1]["role"] == "assistant" for r in turn2)
    assert turn2[0]["messages"][1]["content"].startswith("answer to turn 1")  # its own answer
    assert all(r["model"] == "gpt-x" for r in fake_openai.requests)
    assert (
        sum(
            r["messages"][-1]["content"] == questions[121]["turns"][0] for r in fake_openai.requests
        )
        == 3
    )
    assert out["tokens_generated"] == 7 * 4

    fake_openai.fail_always.clear()
    retry = answer_competitor(cfg, "remote")  # the failed question is produced on the next run
    assert (retry["generated"], retry["reused"], retry["failed"]) == (1, 2, 0)
    secret_seen = [
        p
        for p in Path(cfg.paths.home).rglob("*")
        if p.is_file() and fake_openai.api_key.encode() in p.read_bytes()
    ]
    assert secret_seen == []


def run_questions(cfg) -> str:
    from arenaflow.evaluate.questions import write_questions

    return write_questions(cfg)["uri"]


def test_missing_api_key_names_the_variable(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    cfg = make_cfg(
        "evaluate.competitors=[{name: r, openai_compatible: {base_url: 'http://127.0.0.1:9/v1', "
        "model: m, api_key_env: NO_SUCH_KEY_VAR}}]"
    )
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        answer_competitor(cfg, "r")


def test_bad_competitor_config_is_explained() -> None:
    with pytest.raises(ValueError, match="exactly one of `local`"):
        parse_competitors([{"name": "x"}])
    with pytest.raises(ValueError, match="used twice"):
        parse_competitors([{"name": "a", "local": "base"}, {"name": "a", "local": "base"}])


def test_cli_entry_point_runs_every_competitor(make_cfg, tiny_model_dir: Path) -> None:
    cfg = make_cfg(
        f"evaluate.competitors=[{{name: base, local: base}}, {{name: copy, local: '{tiny_model_dir}'}}]",
        "evaluate.max_new_tokens=4",
        "tracking=none",
    )
    out = run(cfg)
    assert set(out["answers"]) == {"base", "copy"}
    assert all(a["answered"] == 3 and a["failed"] == 0 for a in out["answers"].values())
    assert "skipped" in out["decontamination"]
