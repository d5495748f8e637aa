"""The `make run` driver: dependency order, per-partition runs, reuse of up-to-date assets."""

import dagster as dg
import pytest

from pipelines import run as driver
from pipelines.resources import HydraConfigResource, StageConfig, stage_config

CALLS: list[str] = []
parts = dg.StaticPartitionsDefinition(["a", "b"])


@dg.asset(code_version="1", group_name="data")
def upstream(
    context: dg.AssetExecutionContext, hydra: HydraConfigResource, config: StageConfig
) -> dict:
    cfg, _ = stage_config(context, hydra, config)
    CALLS.append("upstream")
    return {"limit": cfg.data.limit}


@dg.asset(code_version="1", partitions_def=parts, group_name="evaluate")
def per_competitor(context: dg.AssetExecutionContext, upstream: dict) -> dict:
    CALLS.append(f"per_competitor[{context.partition_key}]")
    return {"p": context.partition_key, "limit": upstream["limit"]}


@dg.asset(code_version="1", group_name="serve")
def summary(per_competitor: dict) -> dict:
    CALLS.append("summary")
    return {"keys": sorted(per_competitor)}


@pytest.fixture
def fake_graph(monkeypatch):
    defs = dg.Definitions(
        assets=[summary, per_competitor, upstream], resources={"hydra": HydraConfigResource()}
    )
    monkeypatch.setattr(driver, "build_definitions", lambda: defs)
    CALLS.clear()
    return defs


def test_driver_runs_in_order_then_reuses(fake_graph, tmp_path, af_home) -> None:
    overrides = ["experiment=test", f"paths.home={af_home}", "data.limit=11"]
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        out = driver.materialize_all(overrides, instance)
        assert CALLS == ["upstream", "per_competitor[a]", "per_competitor[b]", "summary"]
        assert fake_graph.load_asset_value("summary", instance=instance) == {"keys": ["a", "b"]}
        assert (
            fake_graph.load_asset_value("per_competitor", instance=instance, partition_key="b")[
                "limit"
            ]
            == 11
        )

        CALLS.clear()
        again = driver.materialize_all(overrides, instance)
        assert CALLS == [] and set(again["timings"].values()) == {"reused"}

        CALLS.clear()  # a changed override invalidates everything downstream of the config
        overrides = [*overrides[:-1], "data.limit=12"]
        driver.materialize_all(overrides, instance)
        assert CALLS == ["upstream", "per_competitor[a]", "per_competitor[b]", "summary"]

        CALLS.clear()  # serve.* reaches only the serve group
        driver.materialize_all([*overrides, "serve.port=8123"], instance)
        assert CALLS == ["summary"]

        CALLS.clear()  # judge.* reaches neither the answers (group evaluate) nor serve
        driver.materialize_all([*overrides, "serve.port=8123", "judge.max_tokens=3"], instance)
        assert CALLS == []

        CALLS.clear()  # evaluate.* reaches the answers and everything after them
        driver.materialize_all(
            [*overrides, "serve.port=8123", "judge.max_tokens=3", "evaluate.max_new_tokens=5"],
            instance,
        )
        assert CALLS == ["per_competitor[a]", "per_competitor[b]", "summary"]
        text = driver.report(fake_graph, instance, out["timings"], 1.0)
        assert "make dev" in text and "per_competitor[a]" in text


def test_stage_config_records_resolved_yaml_without_secrets(af_home) -> None:
    hydra = HydraConfigResource(overrides=["experiment=test", f"paths.home={af_home}"])
    ctx = dg.build_asset_context()
    cfg, meta = stage_config(
        ctx, hydra, StageConfig(overrides=["serve.api_keys=[sk-live-1]", "train.lr=0.5"])
    )
    assert cfg.train.lr == 0.5
    yaml_md = meta["resolved_config"].value
    assert "lr: 0.5" in yaml_md and "sk-live-1" not in yaml_md
    assert meta["hydra_overrides"].value[-2:] == ["serve.api_keys=***", "train.lr=0.5"]


def test_report_prints_a_curl_line_that_hits_the_endpoint(tmp_path) -> None:
    """The deployment's URL already ends in /v1: the curl line must not repeat it."""

    @dg.asset(name="serving_deployment")
    def deployment() -> dict:
        return {"url": "http://127.0.0.1:8123/v1", "pid": 1, "model_uri": "models:/m/1"}

    defs = dg.Definitions(assets=[deployment])
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert dg.materialize([deployment], instance=instance).success
        text = driver.report(defs, instance, {"serving_deployment": 0.1}, 0.1)
    assert "endpoint: http://127.0.0.1:8123/v1" in text
    assert "curl http://127.0.0.1:8123/v1/chat/completions " in text
    assert "/v1/v1" not in text


def test_report_reads_as_tables(tmp_path) -> None:
    """Counts by reason, a rounded loss, aligned MT-bench and leaderboard tables, the served set."""
    values = {
        "sharegpt_clean": {"input": 10, "kept": 7, "dropped": {"too_short": 1, "wrong_format": 2}},
        "sft_dataset": {
            "counts": {"examples": 9, "train": 8, "validation": 1, "kept": 7, "dropped": {}}
        },
        "finetuned_model": {"final_loss": 1.234567891, "model_uri": "models:/m/2"},
        "mt_bench_scores": {
            "scores": {
                "finetuned": {"turn1": 6.5, "turn2": 5.0, "average": 5.75, "expected": 6.1},
                "base": {},
            }
        },
        "leaderboard": {
            "judge_calibration": {
                "passed": False,
                "summary": "judge j failed calibration (tie_rate 0.9 > 0.35)",
                "figures": {"tie_rate": 0.9},
            },
            "rows": [
                {
                    "rank": 1,
                    "model": "finetuned",
                    "rating": 1012.34,
                    "ci_lower": 990.0,
                    "ci_upper": 1040.5,
                    "mt_bench": 5.75,
                    "wins": 3,
                    "ties": 1,
                    "losses": 0,
                    "human_rating": 1005.0,
                    "human_battles": 4,
                },
                {
                    "rank": 2,
                    "model": "base",
                    "rating": 987.66,
                    "ci_lower": 960.0,
                    "ci_upper": 1010.0,
                    "mt_bench": None,
                    "wins": 0,
                    "ties": 1,
                    "losses": 3,
                },
            ],
        },
        "champion_model": {
            "model_uri": "models:/m@champion",
            "version": "1",
            "served_role": "base",
            "outcome": "kept",
            "reason": "champion v1 (base) stays: judge j failed calibration (tie_rate 0.9 > 0.35)",
        },
        "serving_deployment": {
            "url": "http://127.0.0.1:8123/v1",
            "pid": 1,
            "model_uri": "models:/m/2",
            "models": [
                {"id": "finetuned", "alias_of": None},
                {"id": "base", "alias_of": None},
                {"id": "arenaflow-chat", "alias_of": "finetuned"},
            ],
        },
    }

    def make(name: str, value: dict) -> dg.AssetsDefinition:
        @dg.asset(name=name)
        def _asset() -> dict:
            return value

        return _asset

    assets = [make(k, v) for k, v in values.items()]
    defs = dg.Definitions(assets=assets)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert dg.materialize(assets, instance=instance).success
        text = driver.report(defs, instance, {}, 0.1)
    lines = text.splitlines()
    assert "data: 10 conversations in, 7 kept, 3 dropped (wrong_format 2, too_short 1)" in lines
    assert "sft dataset: 9 examples (train 8, validation 1) from 7 conversations" in lines
    assert "training: final loss 1.2346, model models:/m/2" in lines
    assert "  model      turn 1  turn 2   avg  expected" in lines
    assert "  finetuned    6.50    5.00  5.75      6.10" in lines
    assert "  base            -       -     -         -" in lines
    assert "judge calibration: FAILED: judge j failed calibration (tie_rate 0.9 > 0.35)" in lines
    assert "  (uncalibrated judge: these ratings cannot move the champion)" in lines
    assert "champion: models:/m@champion = v1 (base), kept" in lines
    assert "  champion v1 (base) stays: judge j failed calibration (tie_rate 0.9 > 0.35)" in lines
    head = lines.index("  rank  model      rating               CI  MT-bench  W/T/L   human")
    assert lines[head + 1] == "  1     finetuned  1012.3  [990.0, 1040.5]      5.75  3/1/0  1005.0"
    assert lines[head + 2] == "  2     base        987.7  [960.0, 1010.0]         -  0/1/3       -"
    assert (
        "  serves finetuned, base, arenaflow-chat (= finetuned); side-by-side battles at "
        "http://127.0.0.1:8123/arena" in lines
    )
