"""`python -m arenaflow.data` from the shell: all three steps under one parent MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from arenaflow.config import REPO_ROOT


def test_cli_runs_the_stage(af_home, model_cache, tiny_model_dir):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "arenaflow.data",
            "experiment=test",
            f"paths.home={af_home}",
            f"paths.cache_dir={model_cache}",
            "data.limit=200",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data_hash:" in proc.stdout

    stats = json.loads((af_home / "artifacts/data/clean_stats.json").read_text())
    assert stats["input"] == 200
    assert stats["kept"] + sum(stats["dropped"].values()) == 200
    raw_stats = json.loads((af_home / "artifacts/data/raw_stats.json").read_text())
    assert raw_stats["kept"] == 200
    assert (af_home / "artifacts/data/sft_dataset/dataset_dict.json").exists()

    client = MlflowClient(tracking_uri=f"sqlite:///{af_home}/mlflow.db")
    exp = client.get_experiment_by_name("arenaflow")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs["data"]
    for step in ("data.sharegpt_raw", "data.sharegpt_clean", "data.sft_dataset"):
        assert runs[step].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["clean.kept"] == stats["kept"]
    assert parent.data.tags["data_hash"] == runs["data.sft_dataset"].data.tags["data_hash"]
