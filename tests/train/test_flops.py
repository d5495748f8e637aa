"""The CPU peak used for MFU: a real matmul probe, and the best earlier probe of this CPU kept."""

import json

from arenaflow.train import flops


def test_peak_is_the_best_probe_seen_on_this_cpu(tmp_path) -> None:
    first = flops.best_cpu_peak_flops(tmp_path, seconds=0.2)
    assert first > 1e8  # any CPU that runs torch does more than 0.1 GFLOP/s of fp32 matmul
    cache = json.loads((tmp_path / "cpu_peak_flops.json").read_text())
    assert cache == {flops.cpu_key(): first}

    # A better earlier probe (a quieter moment) wins over a fresh one and stays in the cache.
    cache[flops.cpu_key()] = first * 50
    (tmp_path / "cpu_peak_flops.json").write_text(json.dumps(cache))
    assert flops.best_cpu_peak_flops(tmp_path, seconds=0.2) == first * 50

    # Another CPU's entry is not used, and a corrupt cache is replaced, not fatal.
    (tmp_path / "cpu_peak_flops.json").write_text(json.dumps({"other cpu | threads=2": 1e15}))
    assert flops.best_cpu_peak_flops(tmp_path, seconds=0.2) < 1e15
    (tmp_path / "cpu_peak_flops.json").write_text("{not json")
    fresh = flops.best_cpu_peak_flops(tmp_path, seconds=0.2)
    assert json.loads((tmp_path / "cpu_peak_flops.json").read_text()) == {flops.cpu_key(): fresh}


def test_configured_peak_wins_then_the_gpu_datasheet_by_name() -> None:
    import pytest
    from omegaconf import OmegaConf

    hw = OmegaConf.create({"accelerator": "gpu", "precision": "bf16-mixed", "peak_tflops": 400})
    assert flops.peak_flops(hw, device_name="NVIDIA H100 80GB HBM3") == (400e12, "config")

    auto = OmegaConf.create({"accelerator": "gpu", "precision": "bf16-mixed", "peak_tflops": None})
    for name, tflops in [
        ("NVIDIA H100 80GB HBM3", 989),  # SXM
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
    ]:
        assert flops.peak_flops(auto, device_name=name) == (tflops * 1e12, f"datasheet:{name}")

    # an unknown GPU, or fp32 (whose peak depends on TF32 settings), needs the peak in the config
    with pytest.raises(ValueError, match="'NVIDIA A10G'.*set hardware.peak_tflops"):
        flops.peak_flops(auto, device_name="NVIDIA A10G")
    fp32 = OmegaConf.create({"accelerator": "gpu", "precision": "32-true", "peak_tflops": None})
    with pytest.raises(ValueError, match="precision 32-true"):
        flops.peak_flops(fp32, device_name="NVIDIA H100 80GB HBM3")


def test_train_flops_counts_the_head_only_where_it_runs() -> None:
    from arenaflow.train.flops import ModelShape, train_flops

    shape = ModelShape(
        n_params=1_100,
        n_matmul_params=1_000,
        n_layers=2,
        hidden_size=4,
        vocab_size=50,  # head: 200 of the 1000 matmul parameters
        n_heads=1,
        intermediate_size=8,
    )
    attention = 12.0 * 2 * 4 * 100
    assert train_flops(shape, 10, 100) == 6.0 * 1_000 * 10 + attention
    # the head on 3 of the 10 tokens: 800 body parameters x 10 + 200 head parameters x 3
    assert train_flops(shape, 10, 100, head_tokens=3) == 6.0 * (800 * 10 + 200 * 3) + attention
