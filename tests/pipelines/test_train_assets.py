"""Dagster materializations of base_model and finetuned_model on tiny settings.

finetuned_model runs as `hardware=cpu_fsdp`: Pipes starts `python -m arenaflow.train`, which starts
2 ranks with torchrun; FSDP2 really shards the (compiled) decoder layers and the gathered
checkpoint loads in transformers and generates.
"""

import json
from pathlib import Path

import dagster as dg
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arenaflow.tracking import tracker_from_cfg
from pipelines.assets.train import base_model, finetuned_model, finetuned_model_checkpoint_complete
from pipelines.resources import HydraConfigResource, StageConfig, stage_config

CONVERSATIONS = [
    [
        {"from": "human", "value": f"What is {a} plus {b}?"},
        {"from": "gpt", "value": f"{a} plus {b} is {a + b}."},
    ]
    for a in range(1, 9)
    for b in (2, 5)
]


@dg.asset(key="sft_dataset", code_version="test")
def sft_dataset_stub(
    context: dg.AssetExecutionContext, hydra: HydraConfigResource, config: StageConfig
) -> dict:
    """Stands in for the data group's sft_dataset: a small DatasetDict in the documented format."""
    from datasets import Dataset, DatasetDict

    from arenaflow.data.sft import encode_conversation
    from arenaflow.models import load_tokenizer, resolve_model

    cfg, _ = stage_config(context, hydra, config)
    tok = load_tokenizer(resolve_model(cfg.model, cfg.paths.cache_dir), cfg.model)
    rows = []
    for i, conv in enumerate(CONVERSATIONS):
        enc = encode_conversation(tok, conv, max_length=int(cfg.train.max_length))
        rows.append({"id": f"c{i}", **enc, "length": len(enc["input_ids"])})
    out = Path(cfg.paths.artifact_root) / "data" / "sft_dataset"
    DatasetDict(
        train=Dataset.from_list(rows[:14]), validation=Dataset.from_list(rows[14:])
    ).save_to_disk(str(out))
    return {
        "uri": str(out),
        "data_hash": "stub0123456789ab",
        "counts": {"train": 14, "validation": 2},
    }


def test_materialize_base_and_finetuned_model(af_home, model_cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = ["experiment=test", f"paths.home={af_home}", f"paths.cache_dir={model_cache}"]
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize(
            [sft_dataset_stub, base_model, finetuned_model, finetuned_model_checkpoint_complete],
            resources={"hydra": HydraConfigResource(overrides=overrides)},
            run_config=dg.RunConfig(
                ops={
                    "finetuned_model": StageConfig(
                        # the Vicuna recipe's compiled decoder layers, under FSDP2
                        overrides=["hardware=cpu_fsdp", "train.max_steps=3", "train.compile=true"]
                    )
                }
            ),
            instance=instance,
        )
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert [c.check_name for c in checks] == ["finetuned_model_checkpoint_complete"]
        assert checks[0].passed
        base = result.output_for_node("base_model")
        assert (Path(base["path"]) / "model.safetensors").exists()
        assert base["name"] == "tiny-llama" and len(base["chat_template_hash"]) == 16

        value = result.output_for_node("finetuned_model")
        assert value["chat_template_hash"] == base["chat_template_hash"]
        assert value["model_uri"] == f"models:/arenaflow-chat/{value['version']}"
        assert (Path(value["path"]) / "model.safetensors").exists()
        assert value["final_loss"] > 0
        trained = json.loads((Path(value["path"]).parent / "result.json").read_text())
        assert trained["world_size"] == 2 and trained["steps"] == 3
        assert trained["compiled"] is True
        sharding = trained["sharding"]
        assert sharding["sharded_params"] == sharding["params"] > 0
        assert sharding["local_numel"] < 0.6 * sharding["full_numel"]  # rank 0 holds about half
        shards = list((Path(value["path"]).parent / "checkpoints").glob("step-*.ckpt/*.distcp"))
        assert len(shards) == 2  # one shard file per rank

        mat = result.asset_materializations_for_node("finetuned_model")[-1]
        md = mat.metadata
        assert md["steps"].value == 3
        assert md["compiled_layers"].value is True
        assert md["loss_curve"].value.startswith("![loss curve](data:image/png;base64,")
        assert 0 < md["mfu"].value < 1
        assert "mlflow_run" in md
        assert "train.max_steps=3" in json.dumps(md["hydra_overrides"].value)

        # the child process reported its progress back through Pipes
        logs = [
            e.user_message
            for e in instance.all_logs(result.run_id)
            if e.user_message and "step 3/3" in e.user_message
        ]
        assert logs

    model = AutoModelForCausalLM.from_pretrained(value["path"]).eval()
    assert sum(p.numel() for p in model.parameters()) == sharding["full_numel"]
    tok = AutoTokenizer.from_pretrained(value["path"])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4

    from arenaflow.config import compose_config

    info = tracker_from_cfg(compose_config(overrides)).get_version(
        "arenaflow-chat", version=value["version"]
    )
    assert info.tags["data_hash"] == "stub0123456789ab"
