"""Whole LoRA runs on the tiny Llama: killed through the CLI and resumed, registered as an adapter
over the registered base; under FSDP2 (two gloo ranks) killed, resumed from a checkpoint of the
adapters alone to the weights of a run never killed, and merged into the tokens of base + adapter."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from arenaflow.config import REPO_ROOT, compose_config
from arenaflow.tracking import tracker_from_cfg
from arenaflow.train import output_dir, run
from arenaflow.train.tables import missing_checkpoint_files

LORA = ["train=lora", "train.global_batch_size=4", "train.max_length=128", "train.compile=false"]


def _overrides(home: Path, cache: Path, sft_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=test",
        f"paths.home={home}",
        f"paths.cache_dir={cache}",
        f"train.data_uri={sft_dir}",
        *LORA,
        *extra,
    ]


def _kill_when_checkpointed(overrides: list[str], ckpts: Path) -> str:
    """Start the CLI, SIGKILL it once LATEST names a checkpoint; returns what LATEST names."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "arenaflow.train", *overrides],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (ckpts / "LATEST").exists():
        time.sleep(0.2)
    # every process of the run: torchrun starts each rank in a session of its own
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    return (ckpts / "LATEST").read_text().strip()


def _killed_fsdp_run(home: Path, cache: Path, sft_dir: Path, *steps: str) -> tuple[Any, str]:
    """A 2-rank run checkpointing every 2 steps, killed once it has a checkpoint, which must hold
    the adapters and their optimizer state only (no frozen base weight, no 4-bit code or quant
    state); returns its config and the checkpoint LATEST names."""
    from torch.distributed.checkpoint import FileSystemReader

    overrides = _overrides(home, cache, sft_dir, *steps, "train.checkpoint_every_n_steps=2")
    cfg = compose_config(overrides)
    ckpts = output_dir(cfg) / "checkpoints"
    killed_at = _kill_when_checkpointed(overrides, ckpts)
    assert killed_at in ("step-00000002.ckpt", "step-00000004.ckpt")
    keys = FileSystemReader(str(ckpts / killed_at)).read_metadata().state_dict_metadata
    weights = [k for k in keys if k.startswith("state_dict.")]
    assert weights and all(".lora_" in k for k in weights)
    assert any(k.startswith("optimizer_0.") for k in keys)
    return cfg, killed_at


def test_killed_lora_run_resumes_and_registers_an_adapter_over_the_registered_base(
    af_home, model_cache, sft_dir
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    overrides = _overrides(
        af_home, model_cache, sft_dir, "train.max_steps=6", "train.checkpoint_every_n_steps=2"
    )
    cfg = compose_config(overrides)
    ckpts = output_dir(cfg) / "checkpoints"
    killed_at = _kill_when_checkpointed(overrides, ckpts)
    assert killed_at in ("step-00000002.ckpt", "step-00000004.ckpt")
    # one device: a checkpoint holds the adapters (and their optimizer state), not the base
    saved = torch.load(ckpts / killed_at, map_location="cpu", weights_only=False)["state_dict"]
    assert saved and all(".lora_" in k for k in saved)

    result = run(cfg)
    assert result["resumed_from"] == killed_at and result["steps"] == 6
    history = json.loads((output_dir(cfg) / "result.json").read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]

    # the adapter checkpoint: peft's files, the tokenizer with its template, the base it needs
    final = Path(result["path"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()
    }
    assert not (final / "model.safetensors").exists()
    assert missing_checkpoint_files(str(final)) == []  # the finetuned_model asset's check
    (final / "adapter_model.safetensors").rename(final.parent / "moved")
    assert missing_checkpoint_files(str(final)) == ["adapter_model.safetensors"]
    (final.parent / "moved").rename(final / "adapter_model.safetensors")
    meta = json.loads((final / "arenaflow_adapter.json").read_text())
    tracker = tracker_from_cfg(cfg)
    base_version = meta["base"].removeprefix("models:/arenaflow-chat/")
    assert tracker.get_version("arenaflow-chat", version=base_version).tags["arenaflow.role"] == (
        "base"
    )
    assert meta["base_digest"] == meta["base"]  # models.model_identity of a pinned version
    assert result["adapter"] == {**meta, "path": str(final), "merged": False}

    # the registry holds the adapter, its base in the lineage tags
    info = tracker.get_version("arenaflow-chat", version=result["version"])
    assert info.version != base_version
    assert info.tags["adapter"] == "true" and info.tags["base_model"] == meta["base"]
    assert info.tags["base_model_name"] == "tiny-llama" and info.tags["lora_rank"] == "8"
    assert info.tags["data_hash"] == result["data_hash"]
    assert result["trainable_params"] < result["n_params"] / 100
    # measured: AdamW's two fp32 moments and one fp32 gradient per adapter parameter, nothing more
    measured = {k: v * 1024**3 for k, v in result["memory_measured_gb"].items()}
    assert measured["optimizer_gb"] == pytest.approx(8 * result["trainable_params"], rel=0.01)
    assert measured["grads_gb"] == 4 * result["trainable_params"]

    # peft loads it over the base; only the adapters were trained
    base = AutoModelForCausalLM.from_pretrained(cfg_base(cfg))
    model = PeftModel.from_pretrained(base, str(final))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)


def test_fsdp_lora_resumes_exactly_from_adapter_checkpoints_and_merges(
    af_home, model_cache, sft_dir, tiny_tokenizer
) -> None:
    """Two gloo ranks. A killed run: its distributed checkpoint holds the adapters and their
    optimizer state, not the frozen base, and the resumed run ends with the adapter weights of a
    run never killed. That run registers base + adapter merged, which gives the greedy tokens of
    the base with the adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # no dropout: its masks draw from an RNG a resume does not replay
    steps = ["hardware=cpu_fsdp", "train.max_steps=6", "train.lr=1e-2", "train.lora.dropout=0"]
    cfg, killed_at = _killed_fsdp_run(af_home, model_cache, sft_dir, *steps)

    result = run(cfg)
    assert result["resumed_from"] == killed_at and result["steps"] == 6
    resumed = load_file(str(Path(result["path"]) / "adapter_model.safetensors"))

    (af_home.parent / "whole").mkdir()
    whole = compose_config(
        _overrides(
            af_home.parent / "whole",
            model_cache,
            sft_dir,
            *steps,
            "train.checkpoint_every_n_steps=0",
            "train.lora.merge=true",
        )
    )
    result = run(whole)
    assert result["world_size"] == 2 and result["sharding"]["sharded_params"] > 0
    merged_dir, adapter_dir = Path(result["path"]), Path(result["adapter"]["path"])
    straight = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for k in resumed:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-6)

    assert result["adapter"]["merged"] and adapter_dir == merged_dir.parent / "adapter"
    info = tracker_from_cfg(whole).get_version("arenaflow-chat", version=result["version"])
    assert info.tags["merged_adapter"] == "true"
    assert info.tags["adapter_base"] == result["adapter"]["base"]
    assert "adapter" not in info.tags and info.tags["base_model"] == "tiny-llama"
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, tokenize=False
    )
    ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    base = AutoModelForCausalLM.from_pretrained(cfg_base(whole)).eval()
    with torch.no_grad():
        plain = base.generate(ids, **greedy)
        over = PeftModel.from_pretrained(base, str(adapter_dir)).eval().generate(ids, **greedy)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval().generate(ids, **greedy)
    assert merged.tolist() == over.tolist()
    assert merged.tolist() != plain.tolist()  # the adapter changed what the model says


def test_qlora_under_fsdp_shards_the_adapters_holds_the_4bit_base_and_resumes_after_a_kill(
    af_home, model_cache, sft_dir
) -> None:
    """Two gloo ranks over an NF4 base: FSDP2 shards the adapters (and norms, embeddings) while
    every rank holds the 4-bit weights whole; a killed run's checkpoint holds the adapters and
    their optimizer state only, and the resumed run registers its adapter over the base."""
    from safetensors.torch import load_file

    steps = ["hardware=cpu_fsdp", "train.lora.quantize=nf4", "train.max_steps=4"]
    cfg, killed_at = _killed_fsdp_run(af_home, model_cache, sft_dir, *steps)

    result = run(cfg)
    assert result["resumed_from"] == killed_at and result["steps"] == 4
    assert result["world_size"] == 2
    sharding = result["sharding"]
    assert 0 < sharding["sharded_params"] < sharding["params"]  # the 4-bit weights stay whole
    assert result["adapter"]["base"] and not result["adapter"]["merged"]
    adapter = load_file(str(Path(result["path"]) / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().sum()) > 0 for v in lora_b)  # trained, gathered whole
    info = tracker_from_cfg(cfg).get_version("arenaflow-chat", version=result["version"])
    assert info.tags["adapter"] == "true" and info.tags["lora_quantize"] == "nf4"


def cfg_base(cfg) -> str:
    from arenaflow.models import resolve_model

    return str(resolve_model(cfg.model, cfg.paths.cache_dir))
