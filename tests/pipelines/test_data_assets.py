"""Real Dagster materialization of the data group on a 200-record slice of the packaged ShareGPT."""

from __future__ import annotations

import json

import dagster as dg
import datasets
from mlflow.tracking import MlflowClient

from pipelines.assets.data import (
    sft_dataset,
    sharegpt_clean,
    sharegpt_clean_accounts_for_every_record,
    sharegpt_raw,
)
from pipelines.resources import HydraConfigResource


def test_data_group_materializes(tmp_path, af_home, model_cache, tiny_model_dir) -> None:
    overrides = [
        "experiment=test",
        f"paths.home={af_home}",
        f"paths.cache_dir={model_cache}",
        "data.limit=200",
    ]
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        result = dg.materialize(
            [sharegpt_raw, sharegpt_clean, sft_dataset, sharegpt_clean_accounts_for_every_record],
            resources={"hydra": HydraConfigResource(overrides=overrides)},
            instance=instance,
        )
        assert result.success

        raw = result.output_for_node("sharegpt_raw")
        assert raw["count"] == 200 and raw["counts"]["truncated"] is False

        clean = result.output_for_node("sharegpt_clean")
        assert clean["uri"].endswith("data/sharegpt_clean.jsonl")
        stats = json.loads((af_home / "artifacts/data/clean_stats.json").read_text())
        assert stats["input"] == 200
        assert stats["kept"] + sum(stats["dropped"].values()) == 200
        assert 0 < stats["kept"] < 200
        lines = (af_home / "artifacts/data/sharegpt_clean.jsonl").read_text().split("\n")[:-1]
        assert len(lines) == stats["kept"] == clean["count"] == clean["kept"]
        assert clean["dropped"] == stats["dropped"]
        first = json.loads(lines[0])
        assert set(first) == {"id", "conversations"}
        assert [t["from"] for t in first["conversations"][:2]] == ["human", "gpt"]

        checks = result.get_asset_check_evaluations()
        assert [(c.check_name, c.passed) for c in checks] == [
            ("sharegpt_clean_accounts_for_every_record", True)
        ]

        sft = result.output_for_node("sft_dataset")
        assert len(sft["data_hash"]) == 16
        dd = datasets.load_from_disk(sft["uri"])
        assert set(dd) == {"train", "validation"}
        assert len(dd["train"]) == sft["counts"]["train"] > 0
        assert len(dd["validation"]) == sft["counts"]["validation"] >= 1
        row = dd["train"][0]
        assert row["length"] == len(row["input_ids"]) == len(row["labels"]) <= 128
        assert any(x == -100 for x in row["labels"]) and any(x != -100 for x in row["labels"])
        c = sft["counts"]
        assert c["kept"] + sum(c["dropped"].values()) == c["input"] == stats["kept"]

        mats = {
            m.asset_key.to_user_string(): m.metadata
            for m in result.asset_materializations_for_node("sft_dataset")
        }
        meta = mats["sft_dataset"]
        assert "data:image/png;base64," in meta["length_histogram"].value
        assert 0 < meta["trainable_fraction"].value < 1
        assert "resolved_config" in meta
        clean_meta = result.asset_materializations_for_node("sharegpt_clean")[0].metadata
        assert "| reason | count |" in clean_meta["drop_reasons"].value

    client = MlflowClient(tracking_uri=f"sqlite:///{af_home}/mlflow.db")
    exp = client.get_experiment_by_name("arenaflow")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"data.sharegpt_raw", "data.sharegpt_clean", "data.sft_dataset"} <= set(by_name)
    assert by_name["data.sharegpt_clean"].data.metrics["clean.input"] == 200
    assert by_name["data.sft_dataset"].data.tags["data_hash"] == sft["data_hash"]
