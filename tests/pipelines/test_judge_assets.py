"""Real Dagster materializations of mt_bench_judgments and mt_bench_scores for two competitors,
with the local judge on the tiny model; upstream assets are small test-local stand-ins."""

from pathlib import Path
from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.judge.prompts import package_data_dir
from pipelines.assets.evaluate import competitors_partitions
from pipelines.assets.judge import (
    CALIBRATION_CHECK,
    CONSISTENCY_CHECK,
    PARSE_CHECK,
    mt_bench_judgments,
    mt_bench_scores,
)
from pipelines.resources import HydraConfigResource

QUESTION_IDS = (81, 121)


def upstream_assets(root: Path, tiny_model_dir: Path) -> list[dg.AssetsDefinition]:
    @dg.asset(name="mt_bench_questions")
    def questions() -> dict[str, Any]:
        rows = [
            q
            for q in io.read_jsonl(io.join(package_data_dir(), "mt_bench", "question.jsonl"))
            if q["question_id"] in QUESTION_IDS
        ]
        uri = str(root / "question.jsonl")
        io.write_jsonl(uri, rows)
        return {"uri": uri, "count": len(rows), "question_ids": list(QUESTION_IDS)}

    @dg.asset(name="mt_bench_answers", partitions_def=competitors_partitions)
    def answers(context: dg.AssetExecutionContext) -> dict[str, Any]:
        name = context.partition_key
        uri = str(root / f"{name}.jsonl")
        io.write_jsonl(
            uri,
            [
                {
                    "question_id": qid,
                    "answer_id": f"{name}-{qid}",
                    "model_id": name,
                    "choices": [{"index": 0, "turns": [f"{name} says hi.", f"{name} again."]}],
                    "tstamp": 0.0,
                }
                for qid in QUESTION_IDS
            ],
        )
        return {"uri": uri, "model_id": name, "answered": len(QUESTION_IDS), "failed": 0}

    @dg.asset(name="base_model")
    def base() -> dict[str, Any]:
        return {"path": str(tiny_model_dir), "name": "tiny-llama", "chat_template_hash": "x"}

    return [questions, answers, base]


def test_materialize_judgments_and_scores(
    tmp_path: Path, af_home: Path, model_cache: Path, tiny_model_dir: Path
) -> None:
    overrides = [
        "experiment=test",
        f"paths.home={af_home}",
        f"paths.cache_dir={model_cache}",
        "judge.model_name=tiny-judge",
        "judge.max_tokens=2",
    ]
    resources = {
        "hydra": HydraConfigResource(overrides=overrides),
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    instance = dg.DagsterInstance.ephemeral()
    upstream = upstream_assets(tmp_path, tiny_model_dir)
    assert set(competitors_partitions.get_partition_keys()) == {"finetuned", "base"}
    for key in competitors_partitions.get_partition_keys():
        dg.materialize(
            upstream,
            partition_key=key,
            selection=[dg.AssetKey("mt_bench_answers")],
            resources=resources,
            instance=instance,
        )
    dg.materialize(
        upstream,
        selection=[dg.AssetKey("mt_bench_questions"), dg.AssetKey("base_model")],
        resources=resources,
        instance=instance,
    )

    result = dg.materialize(
        [*upstream, mt_bench_judgments, mt_bench_scores],
        selection=[mt_bench_judgments, mt_bench_scores],
        resources=resources,
        instance=instance,
    )
    assert result.success
    judged = result.output_for_node("mt_bench_judgments")
    # 2 questions x 2 turns: 2 single each, 1 pair (both orders)
    assert judged["counts"]["single"] == 8 and judged["counts"]["pair"] == 4
    assert set(judged["competitors"]) == {"finetuned", "base"}
    assert judged["single_uri"].endswith("mt_bench/mt_bench/model_judgment/tiny-judge_single.jsonl")
    rows = list(io.read_jsonl(judged["pair_uri"]))
    assert {(r["model_1"], r["model_2"]) for r in rows} == {("finetuned", "base")}
    assert {r["judge"][1] for r in rows} == {
        "pair-v2",
        "pair-v2-multi-turn",
        "pair-math-v1",
        "pair-math-v1-multi-turn",
    }

    scores = result.output_for_node("mt_bench_scores")
    assert set(scores["scores"]) == {"finetuned", "base"}
    assert all(1 <= s["average"] <= 9 for s in scores["scores"].values())
    assert io.exists(scores["uri"])

    meta = result.asset_materializations_for_node("mt_bench_judgments")[0].metadata
    # 16 judge replies (8 single + 2 x 4 pairwise) and 30 calibration replies, none with a
    # verdict, each read from logprobs
    assert judged["counts"]["verdict_logprobs"] == 16 + 30
    # + 30 calibration calls (3 questions x 10), each recovered from logprobs too
    assert meta["calls_made"].value == (16 + 30) * 2 and meta["calls_cached"].value == 0
    assert meta["calibration_calls"].value == 30 and meta["judge_calibrated"].value is False
    assert "mlflow_run" not in meta or meta["mlflow_run"].value.startswith("http")
    score_meta = result.asset_materializations_for_node("mt_bench_scores")[0].metadata
    assert "data:image/png;base64," in score_meta["radar"].value
    assert "finetuned" in score_meta["mt_bench"].value

    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert set(checks) == {PARSE_CHECK, CONSISTENCY_CHECK, CALIBRATION_CHECK}
    # a random tiny model cannot tell reference answers from null ones: it may not promote
    assert checks[CALIBRATION_CHECK].passed is False
    assert checks[CALIBRATION_CHECK].severity == dg.AssetCheckSeverity.ERROR
    assert "failed calibration" in checks[CALIBRATION_CHECK].description
    assert judged["calibration"]["passed"] is False
    assert "Uncalibrated judge" in score_meta["mt_bench"].value
    # a random tiny model writes no verdict: the parse-failure check warns
    assert checks[PARSE_CHECK].passed is False
    assert checks[PARSE_CHECK].severity == dg.AssetCheckSeverity.WARN
