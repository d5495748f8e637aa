"""A whole training run on the tiny Llama: killed via the CLI, resumed, registered in MLflow.

The 2-rank cpu_fsdp run is tested through Dagster Pipes in tests/pipelines/test_train_assets.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from arenaflow.config import REPO_ROOT
from arenaflow.tracking import tracker_from_cfg
from arenaflow.train import output_dir, run
from arenaflow.train.allocator import glibc


def _overrides(cfg_home: Path, cache: Path, sft_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=test",
        f"paths.home={cfg_home}",
        f"paths.cache_dir={cache}",
        f"train.data_uri={sft_dir}",
        *extra,
    ]


def _cli(overrides: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "arenaflow.train", *overrides],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def test_killed_run_resumes_then_registers_a_tagged_model_version(
    af_home, model_cache, sft_dir, tiny_tokenizer
) -> None:
    from transformers import AutoModelForCausalLM

    from arenaflow.config import compose_config

    overrides = _overrides(
        af_home, model_cache, sft_dir, "train.max_steps=6", "train.checkpoint_every_n_steps=2"
    )
    cfg = compose_config(overrides)
    ckpts = output_dir(cfg) / "checkpoints"
    proc = _cli(overrides)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "LATEST").exists():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = (ckpts / "LATEST").read_text().strip()
    assert killed_at in ("step-00000002.ckpt", "step-00000004.ckpt")
    assert not (output_dir(cfg) / "result.json").exists()

    result = run(cfg)
    assert result["resumed_from"] == killed_at
    assert result["steps"] == 6
    history = json.loads((output_dir(cfg) / "result.json").read_text())["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]

    # the resumed run registered the gathered model with its lineage tags
    assert result["model_uri"] == f"models:/arenaflow-chat/{result['version']}"
    info = tracker_from_cfg(cfg).get_version("arenaflow-chat", version=result["version"])
    assert info.tags["base_model"] == "tiny-llama"
    assert info.tags["data_hash"] == result["data_hash"] and len(result["data_hash"]) == 16
    assert info.tags["chat_template_hash"] == result["chat_template_hash"]
    assert info.tags["git_commit"] not in ("", "unknown")
    client = tracker_from_cfg(cfg).client
    resumed_step = int(killed_at.removeprefix("step-").removesuffix(".ckpt"))
    losses = client.get_metric_history(result["run_id"], "loss")
    assert [m.step for m in losses] == list(range(resumed_step + 1, 7))
    assert {"lr", "grad_norm", "tokens_per_s", "val_loss", "mfu"} <= set(
        client.get_run(result["run_id"]).data.metrics
    )
    assert client.get_run(result["run_id"]).data.params["train.lr"] == "0.001"
    assert 0 < result["mfu"] < 1 and result["trained_tokens_per_s"] > 0
    assert result["retained_heap"] is (glibc() is not None)  # on by default on CPU
    model = AutoModelForCausalLM.from_pretrained(result["path"])
    tied = model.get_output_embeddings().weight
    assert tied.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_every_epoch_draws_a_new_batch_order(af_home, model_cache, sft_dir) -> None:
    """Two epochs see the same micro-batches (grouped by length) in two different orders."""
    from arenaflow.config import compose_config

    cfg = compose_config(
        _overrides(
            af_home,
            model_cache,
            sft_dir,
            "tracking=none",
            "train.max_steps=-1",
            "train.epochs=2",
            "train.checkpoint_every_n_steps=0",
            "train.register=false",
            "hardware.retain_freed_memory=false",
        )
    )
    result = run(cfg)
    assert result["retained_heap"] is False  # the knob turns the heap setting off
    history = json.loads((output_dir(cfg) / "result.json").read_text())["history"]
    assert result["steps"] == len(history) == 12  # 24 rows, 4 per step, 2 epochs
    epochs = [
        [(r["input_tokens"], r["trained_tokens"]) for r in history[i : i + 6]] for i in (0, 6)
    ]
    assert sorted(epochs[0]) == sorted(epochs[1])  # every row once per epoch ...
    assert epochs[0] != epochs[1]  # ... in a new order
