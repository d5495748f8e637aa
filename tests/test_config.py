"""The config tree: every option of every group composes and resolves; the CLI prints the config."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from arenaflow.config import compose_config, conf_dir

GROUPS = [
    "hardware",
    "model",
    "data",
    "train",
    "evaluate",
    "judge",
    "rating",
    "serve",
    "chat",
    "tracking",
    "paths",
    "experiment",
]
# Options that deliberately require a value from the user (marked ??? in YAML).
NEEDS = {
    ("model", "local"): ["model.path=/models/x"],
    ("judge", "openai_compatible"): ["judge.base_url=http://127.0.0.1:9/v1", "judge.model=m"],
}


def options(group: str) -> list[str]:
    return sorted(
        p.stem
        for p in (conf_dir() / group).glob("*.yaml")
        if p.stem != "default" or group in {"paths"}
    )


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group: str, option: str, tmp_path) -> None:
    cfg = compose_config(
        [f"{group}={option}", f"paths.home={tmp_path}", *NEEDS.get((group, option), [])]
    )
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["project"] == "arenaflow"
    for g in GROUPS[:-1]:
        assert g in container, f"{group}={option} lost the {g} group"


def test_hardware_targets_change_only_what_differs() -> None:
    cpu = compose_config(["hardware=cpu"]).hardware
    fsdp = compose_config(["hardware=cpu_fsdp"]).hardware
    a100 = compose_config(["hardware=a100_4x"]).hardware
    assert (cpu.devices, cpu.strategy) == (1, "single")
    assert (fsdp.devices, fsdp.strategy, fsdp.process_group_backend) == (2, "fsdp", "gloo")
    assert (a100.devices, a100.precision, a100.process_group_backend) == (4, "bf16-mixed", "nccl")
    assert a100.activation_checkpointing is True and cpu.activation_checkpointing is False


def test_experiment_overrides_groups_and_values(tmp_path) -> None:
    demo = compose_config(["experiment=demo", f"paths.home={tmp_path}"])
    assert demo.model.name == "smollm2-135m-instruct"
    assert demo.train.max_length == 512 and demo.train.max_steps > 0
    assert demo.evaluate.limit_per_category == 1
    test = compose_config(["experiment=test", f"paths.home={tmp_path}", "data.limit=7"])
    assert test.model.name == "tiny-llama" and test.data.limit == 7


def test_artifact_root_is_under_home_and_overridable(tmp_path) -> None:
    cfg = compose_config([f"paths.home={tmp_path}"])
    assert cfg.paths.artifact_root == f"{tmp_path}/artifacts"
    cfg = compose_config(["paths.artifact_root=memory://af"])
    assert cfg.paths.artifact_root == "memory://af"


def test_bad_override_names_the_problem() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="hardware"):
        compose_config(["hardware=tpu_pod"])


def test_stage_cli_prints_resolved_config(tmp_path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "arenaflow.data",
            "--cfg",
            "job",
            "experiment=test",
            f"paths.home={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.model.name == "tiny-llama"
    assert printed.data.limit == 200
