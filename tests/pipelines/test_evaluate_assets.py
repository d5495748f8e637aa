"""Real Dagster materializations of the evaluate group on the tiny model and 3 MT-bench questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.evaluate.questions import load_questions, question_source
from pipelines.assets import evaluate as ev
from pipelines.resources import HydraConfigResource


def test_two_competitor_partitions_and_decontamination(
    af_home: Path, model_cache: Path, tiny_model_dir: Path
) -> None:
    overrides = [
        "experiment=test",
        f"paths.home={af_home}",
        f"paths.cache_dir={model_cache}",
        "evaluate.max_new_tokens=4",
    ]
    sft_uri = str(af_home / "artifacts" / "data" / "sharegpt_clean.jsonl")
    q111 = {q["question_id"]: q for q in load_questions(question_source_cfg())[0]}[111]

    @dg.asset(name="base_model", group_name="train")
    def base_model() -> dict[str, Any]:
        return {"path": str(tiny_model_dir), "name": "tiny-llama"}

    @dg.asset(name="finetuned_model", group_name="train")
    def finetuned_model() -> dict[str, Any]:
        return {"path": str(tiny_model_dir), "model_uri": None, "version": None}

    @dg.asset(name="sharegpt_clean", group_name="data")
    def sharegpt_clean() -> dict[str, Any]:
        rows = [
            {"id": "copy", "conversations": [{"from": "human", "value": q111["turns"][0]}]},
            {"id": "ok", "conversations": [{"from": "human", "value": "Tell me about tea."}]},
        ]
        io.write_text(sft_uri, "".join(json.dumps(r) + "\n" for r in rows))
        return {"uri": sft_uri}

    assets = [
        base_model,
        finetuned_model,
        sharegpt_clean,
        ev.mt_bench_questions,
        ev.mt_bench_answers,
        ev.decontamination_report,
    ]
    resources = {"hydra": HydraConfigResource(overrides=overrides)}
    instance = dg.DagsterInstance.ephemeral()
    assert ev.competitors_partitions.get_partition_keys() == ["finetuned", "base"]

    first = dg.materialize(
        assets,
        resources=resources,
        instance=instance,
        partition_key="finetuned",
    )
    assert first.success
    questions = first.output_for_node("mt_bench_questions")
    assert questions["question_ids"] == [81, 111, 121] and questions["count"] == 3
    finetuned = first.output_for_node("mt_bench_answers")
    assert finetuned["model_id"] == "finetuned" and finetuned["answered"] == 3
    assert finetuned["uri"].endswith("mt_bench/mt_bench/model_answer/finetuned.jsonl")

    report = first.output_for_node("decontamination_report")
    assert report["contaminated_question_ids"] == [111]
    (check,) = first.get_asset_check_evaluations()
    assert check.check_name == ev.CHECK and check.passed is False
    assert check.severity == dg.AssetCheckSeverity.WARN

    second = dg.materialize(
        [*assets[:3], ev.mt_bench_questions, ev.mt_bench_answers],
        resources=resources,
        instance=instance,
        partition_key="base",
        selection=[dg.AssetKey("mt_bench_answers")],
    )
    assert second.success
    base = second.output_for_node("mt_bench_answers")
    assert base["model_id"] == "base" and (base["answered"], base["failed"]) == (3, 0)
    rows = list(io.read_jsonl(base["uri"]))
    assert {r["model_id"] for r in rows} == {"base"} and len(rows) == 3

    mats = second.asset_materializations_for_node("mt_bench_answers")
    meta = mats[0].metadata
    assert meta["answers"].value == 3 and meta["tokens_generated"].value > 0
    assert "question_id" in meta["sample_answers"].value and "mlflow_run" in meta
    answered = instance.get_materialized_partitions(dg.AssetKey("mt_bench_answers"))
    assert answered == {"finetuned", "base"}


def question_source_cfg() -> str:
    from arenaflow.config import compose_config

    return question_source(compose_config(["experiment=test"]))
