"""Tracking against a real MLflow store in a temp dir; secrets never reach it."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from arenaflow.redact import redact
from arenaflow.tracking import NullTracker, parse_models_uri, tracker_from_cfg


def test_stage_run_logs_resolved_config_without_secrets(make_cfg) -> None:
    cfg = make_cfg("serve.api_keys=[sk-secret-123]", "train.lr=3e-4")
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("train", cfg, run_name="train-test") as run:
        run.log_metrics({"loss": 1.5}, step=1)
        run.log_metrics({"loss": 0.5}, step=2)
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name("arenaflow")
    r = client.get_run(run.run_id)
    assert r.info.experiment_id == exp.experiment_id and r.info.status == "FINISHED"
    assert r.data.params["train.lr"] == "0.0003"
    assert r.data.params["serve.api_keys"] == "***"
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [1.5, 0.5]
    config_yaml = Path(client.download_artifacts(run.run_id, "config.yaml")).read_text()
    assert "sk-secret-123" not in config_yaml and "lr: 0.0003" in config_yaml
    assert run.url and run.run_id in run.url


def test_failed_stage_marks_run_failed(make_cfg) -> None:
    cfg = make_cfg()
    tracker = tracker_from_cfg(cfg)
    with pytest.raises(RuntimeError), tracker.start_run("data", cfg) as run:
        raise RuntimeError("boom")
    assert MlflowClient(cfg.tracking.tracking_uri).get_run(run.run_id).info.status == "FAILED"


def test_registry_versions_aliases_and_download(make_cfg, tmp_path) -> None:
    cfg = make_cfg()
    tracker = tracker_from_cfg(cfg)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"a": 1}')
    with tracker.start_run("train", cfg) as run:
        v1 = tracker.register_model(run, ckpt, "arenaflow-chat", tags={"base_model": "tiny"})
        v2 = tracker.register_model(run, ckpt, "arenaflow-chat")
    assert (v1.version, v2.version) == ("1", "2")
    tracker.set_alias("arenaflow-chat", "champion", v2.version)
    assert tracker.get_version("arenaflow-chat", alias="champion").version == "2"
    assert tracker.get_version("arenaflow-chat", version="1").tags["base_model"] == "tiny"
    local = tracker.download_model("models:/arenaflow-chat@champion", tmp_path / "dl")
    assert (local / "config.json").read_text() == '{"a": 1}'
    with pytest.raises(ValueError, match="no alias @nope"):
        tracker.download_model("models:/arenaflow-chat@nope")


def test_null_tracker_records_nothing_and_explains_model_uris(make_cfg) -> None:
    cfg = make_cfg("tracking=none")
    tracker = tracker_from_cfg(cfg)
    assert isinstance(tracker, NullTracker) and not tracker.enabled
    with tracker.start_run("data", cfg) as run:
        run.log_metrics({"x": 1.0})
    assert run.run_id is None
    with pytest.raises(ValueError, match="tracking is disabled"):
        tracker.download_model("models:/m/1")


def test_redact_and_uri_parsing() -> None:
    assert redact({"api_key": "k", "api_key_env": "OPENAI_API_KEY", "x": {"token": "t"}}) == {
        "api_key": "***",
        "api_key_env": "OPENAI_API_KEY",
        "x": {"token": "***"},
    }
    assert parse_models_uri("models:/a/3") == ("a", "3", None)
    assert parse_models_uri("models:/a@champion") == ("a", None, "champion")
    with pytest.raises(ValueError):
        parse_models_uri("runs:/x")
