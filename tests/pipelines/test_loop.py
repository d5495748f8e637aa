"""The whole loop, not stubs: data -> train -> answers -> judgments -> battles -> leaderboard ->
champion -> serving_deployment, materialized by the `make run` driver on tiny settings, then an
HTTP request to the deployed endpoint. Only the judge (a paid API) is stood in for, at the HTTP
boundary: its policy follows `judge.model`, so three judges give three verdicts on one pipeline.

- prefer-base: the judge passes calibration and prefers the base: the base stays champion, served.
- random: the judge answers at random: it fails calibration, the champion does not move.
- prefer-finetuned: it passes calibration and prefers the fine-tune: promoted, and served.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from arenaflow import io
from arenaflow.config import compose_config
from arenaflow.serve.deploy import undeploy
from pipelines import run as driver
from tests.judge.judge_standin import reference_reply, start_stand_in

pytestmark = pytest.mark.timeout(1500)


class AnswerBook:
    """Which competitor wrote an answer, read from the answer files the pipeline wrote."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def turn_one(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in ("base", "finetuned"):
            uri = self.folder / f"{name}.jsonl"
            for row in io.read_jsonl(str(uri)) if uri.exists() else []:
                text = row["choices"][0]["turns"][0].strip()
                if len(text) >= 8:  # too short to recognise in a prompt
                    out.setdefault(name, []).append(text)
        return out

    def first(self, prompt: str) -> str | None:
        """The competitor whose answer comes first in the prompt (position A in pairwise)."""
        found = {
            name: min((prompt.find(t) for t in texts if t in prompt), default=-1)
            for name, texts in self.turn_one().items()
        }
        found = {k: v for k, v in found.items() if v >= 0}
        if len(found) == 2 and len(set(found.values())) == 1:
            return None  # the same text: cannot tell them apart
        return min(found, key=found.get) if found else None


def policy(book: AnswerBook):
    def reply(body: dict[str, Any]) -> str:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        mode, pairwise = body["model"], "[[A]]" in system
        if mode == "random":
            rng = random.Random(user)
            return f"[[{rng.choice('ABC')}]]" if pairwise else f"[[{rng.randint(1, 10)}]]"
        known = reference_reply(system, user)
        if known is not None:
            return known
        favourite = mode.removeprefix("prefer-")
        first = book.first(user)
        if first is None:
            return "[[C]]" if pairwise else "[[5]]"
        if pairwise:
            return "[[A]]" if first == favourite else "[[B]]"
        return "[[8]]" if first == favourite else "[[3]]"

    return reply


@pytest.fixture
def judge_server(af_home: Path):
    state, server, thread = start_stand_in()
    state.policy = policy(
        AnswerBook(af_home / "artifacts" / "mt_bench" / "mt_bench" / "model_answer")
    )
    yield state
    server.should_exit = True
    thread.join(timeout=5)


def test_the_loop_serves_the_model_the_evidence_supports(
    af_home: Path, model_cache: Path, tmp_path: Path, judge_server, monkeypatch
) -> None:
    monkeypatch.delenv("ARENAFLOW_API_KEYS", raising=False)
    common = [
        "experiment=test",
        # 8 questions, 16 battles: enough that a judge preferring one side is significant even
        # where the two tiny models wrote the same answer (a tie)
        "evaluate.question_ids=[81,82,101,102,111,112,121,122]",
        f"paths.home={af_home}",
        f"paths.cache_dir={model_cache}",
        "judge=openai_compatible",
        f"judge.base_url={judge_server.url}",
        "judge.concurrency=4",
        "judge.timeout=10",
        "rating.bootstrap_rounds=200",
        "serve.deploy.smoke_questions=1",
        "serve.deploy.smoke_max_tokens=4",
        "serve.deploy.ready_timeout_s=120",
    ]
    cfg = compose_config(common)

    def loop(judge_model: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
        out = driver.materialize_all([*common, f"judge.model={judge_model}"], instance)
        defs = out["defs"]
        value = {
            key: defs.load_asset_value(key, instance=instance)
            for key in ("base_model", "finetuned_model", "champion_model", "serving_deployment")
        }
        value["judgments"] = defs.load_asset_value("mt_bench_judgments", instance=instance)
        card = httpx.get(f"{value['serving_deployment']['url']}/models", timeout=30).json()
        return value, driver.report(defs, instance, out["timings"], 0.0), card["data"][0]

    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        try:
            v, report, card = loop("prefer-base")
            base, tuned = v["base_model"]["version"], v["finetuned_model"]["version"]
            assert base and tuned and base != tuned
            book = AnswerBook(af_home / "artifacts" / "mt_bench" / "mt_bench" / "model_answer")
            assert set(book.turn_one()) == {"base", "finetuned"}, "answers to tell apart"
            assert v["judgments"]["calibration"]["passed"], v["judgments"]["calibration"]
            champ = v["champion_model"]
            assert champ["version"] == base and not champ["promoted"], champ["reason"]
            assert champ["served_role"] == "base" and champ["challenger"] == "finetuned"
            assert card["version"] == base and card["lineage"]["arenaflow.role"] == "base"
            assert v["serving_deployment"]["version"] == base
            assert f"champion: models:/arenaflow-chat@champion = v{base} (base), kept" in report
            assert "judge calibration: passed" in report

            v, report, card = loop("random")
            cal = v["judgments"]["calibration"]
            assert not cal["passed"] and "failed calibration" in cal["summary"]
            champ = v["champion_model"]
            assert champ["version"] == base and not champ["promoted"]
            assert "failed calibration" in champ["reason"]
            assert card["version"] == base
            assert "judge calibration: FAILED" in report
            assert "cannot move the champion" in report

            v, report, card = loop("prefer-finetuned")
            champ = v["champion_model"]
            assert champ["promoted"] and champ["version"] == tuned, champ["reason"]
            assert champ["diff_lower"] > 0 and champ["p_better"] > 0.95
            assert card["version"] == tuned and v["serving_deployment"]["version"] == tuned
            line = f"champion: models:/arenaflow-chat@champion = v{tuned} (fine-tuned), promoted"
            assert line in report
            assert f"promoted finetuned (v{tuned}) over champion v{base} (base)" in report
        finally:
            undeploy(cfg)
