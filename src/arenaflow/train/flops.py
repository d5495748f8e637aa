"""Model FLOPs and device peak, for MFU (model FLOPs utilization).

MFU counts only useful work: 6 FLOPs per matmul parameter per non-padding token (forward +
backward) plus causal attention over each sample's own length; padding and activation
recomputation are not counted. On CPU the peak is measured with a short fp32 matmul probe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What MFU and the memory preflight need to know about a model."""

    n_params: int
    n_matmul_params: int  # parameters used in matmuls per token (input embedding excluded)
    n_layers: int
    hidden_size: int
    vocab_size: int
    n_heads: int
    intermediate_size: int


def model_shape(config: Any) -> ModelShape:
    """Count parameters exactly by building the model on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # a tied lm_head still runs its matmul: count the table once as matmul parameters
    n_matmul = n_params - embed + (embed if tied else 0)
    return ModelShape(
        n_params=n_params,
        n_matmul_params=n_matmul,
        n_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        n_heads=int(config.num_attention_heads),
        intermediate_size=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
    )


def train_flops(shape: ModelShape, tokens: int, attn_sq: int) -> float:
    """Forward+backward FLOPs for `tokens` non-padding tokens whose samples' squared lengths sum to `attn_sq`."""
    return (
        6.0 * shape.n_matmul_params * tokens + 12.0 * shape.n_layers * shape.hidden_size * attn_sq
    )


def measure_cpu_peak_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Best observed fp32 matmul FLOP/s on this CPU with torch's thread pool."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2.0 * size**3 / dt)
    log.info("CPU fp32 matmul peak probe: %.1f GFLOP/s", best / 1e9)
    return best


def peak_flops(hardware: Any) -> tuple[float, str]:
    """Per-device peak FLOP/s: `hardware.peak_tflops` when set, else a CPU probe."""
    if hardware.get("peak_tflops"):
        return float(hardware.peak_tflops) * 1e12, "config"
    if hardware.accelerator != "cpu":
        raise ValueError(
            "hardware.peak_tflops is null on a GPU target; set it to the device's dense peak "
            "for the training precision (e.g. 312 for A100 bf16, 989 for H100 SXM bf16)"
        )
    return measure_cpu_peak_flops(), "cpu_fp32_matmul_probe"
