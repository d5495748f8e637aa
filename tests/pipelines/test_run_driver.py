"""The `make run` driver: dependency order, per-partition runs, reuse of up-to-date assets."""

import dagster as dg
import pytest

from pipelines import run as driver
from pipelines.resources import HydraConfigResource, StageConfig, stage_config

CALLS: list[str] = []
parts = dg.StaticPartitionsDefinition(["a", "b"])


@dg.asset(code_version="1")
def upstream(
    context: dg.AssetExecutionContext, hydra: HydraConfigResource, config: StageConfig
) -> dict:
    cfg, _ = stage_config(context, hydra, config)
    CALLS.append("upstream")
    return {"limit": cfg.data.limit}


@dg.asset(code_version="1", partitions_def=parts)
def per_competitor(context: dg.AssetExecutionContext, upstream: dict) -> dict:
    CALLS.append(f"per_competitor[{context.partition_key}]")
    return {"p": context.partition_key, "limit": upstream["limit"]}


@dg.asset(code_version="1")
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
        driver.materialize_all([*overrides[:-1], "data.limit=12"], instance)
        assert CALLS == ["upstream", "per_competitor[a]", "per_competitor[b]", "summary"]
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
