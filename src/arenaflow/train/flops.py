"""Model FLOPs and device peak, for MFU (model FLOPs utilization).

MFU counts only useful work: 6 FLOPs per matmul parameter per non-padding token (forward +
backward) plus causal attention over each sample's own length; padding and activation
recomputation are not counted. On a GPU the peak is the datasheet's dense 16-bit figure for its
name (or `hardware.peak_tflops`). On CPU the peak is measured with a short fp32 matmul probe; a probe
taken while other work shares the cores reads low (and MFU high), so the best probe seen on this
CPU (model name + thread count) is kept in a small cache file and the peak is the larger of the two.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
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


def train_flops(
    shape: ModelShape,
    tokens: int,
    attn_sq: int,
    head_tokens: int | None = None,
    frozen_weights: bool = False,
) -> float:
    """Forward+backward FLOPs for `tokens` non-padding tokens whose samples' squared lengths sum to
    `attn_sq`; the output head (hidden x vocab) runs on `head_tokens` of them (default all: a
    recipe that projects only the labelled positions onto the vocabulary does less work).

    `frozen_weights` (LoRA): the base's weights get no gradient, so its matmuls cost 4 FLOPs per
    parameter per token (forward, and the backward to the inputs) instead of 6; the adapters'
    own matmuls (~1% of the base's at rank 8) are not counted."""
    head = shape.hidden_size * shape.vocab_size
    head_tokens = tokens if head_tokens is None else head_tokens
    per_param = 4.0 if frozen_weights else 6.0
    return (
        per_param * (shape.n_matmul_params - head) * tokens
        + per_param * head * head_tokens
        + 12.0 * shape.n_layers * shape.hidden_size * attn_sq
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


def cpu_key() -> str:
    """This CPU's model name and torch's thread count: probes are comparable only within a key."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} | threads={torch.get_num_threads()}"


def best_cpu_peak_flops(cache_dir: str | Path | None, seconds: float = 1.0) -> float:
    """max(a fresh probe, the best earlier probe of this CPU), the cache updated with the max."""
    fresh = measure_cpu_peak_flops(seconds=seconds)
    if cache_dir is None:
        return fresh
    path = Path(cache_dir) / "cpu_peak_flops.json"
    key = cpu_key()
    try:
        seen = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        seen = {}
    best = max(fresh, float(seen.get(key, 0.0)))
    if best > float(seen.get(key, 0.0)):
        seen[key] = best
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(seen, indent=1))
            tmp.replace(path)
        except OSError as e:  # a read-only cache only loses the memory of a better probe
            log.warning("could not update %s: %s", path, e)
    if best > fresh * 1.05:
        log.info(
            "CPU peak: %.1f GFLOP/s (best earlier probe; this one read %.1f: the cores are shared)",
            best / 1e9,
            fresh / 1e9,
        )
    return best


# Dense (no structured sparsity) 16-bit tensor-core peaks from the vendors' datasheets, TFLOP/s,
# matched on torch.cuda.get_device_name(); more specific names come first.
GPU_PEAK_TFLOPS_16BIT: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIE\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def sixteen_bit(precision: object) -> bool:
    """Whether a Lightning precision ("bf16-mixed", "16-true", ...) computes in 16 bits."""
    return "16" in str(precision)


def gpu_datasheet_peak(device_name: str, precision: str) -> float | None:
    """The dense 16-bit peak FLOP/s of a GPU known by name, or None (unknown GPU, or a precision
    whose peak depends on settings the name does not tell, such as fp32 with or without TF32)."""
    if not sixteen_bit(precision):
        return None
    name = device_name.upper()
    for pattern, tflops in GPU_PEAK_TFLOPS_16BIT:
        if re.search(pattern, name):
            return tflops * 1e12
    return None


def peak_flops(
    hardware: Any, cache_dir: str | Path | None = None, device_name: str | None = None
) -> tuple[float, str]:
    """Per-device peak FLOP/s: `hardware.peak_tflops` when set; else on a GPU the datasheet peak
    for its name and precision; else the CPU probe (best seen)."""
    if hardware.peak_tflops:
        return float(hardware.peak_tflops) * 1e12, "config"
    if hardware.accelerator == "cpu":
        return best_cpu_peak_flops(cache_dir), "cpu_fp32_matmul_probe"
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    peak = gpu_datasheet_peak(device_name, hardware.precision)
    if peak is None:
        raise ValueError(
            f"no known peak for {device_name!r} at precision {hardware.precision}; set "
            "hardware.peak_tflops to the device's dense peak for the training precision "
            "(e.g. 312 for A100 bf16, 989 for H100 SXM bf16)"
        )
    return peak, f"datasheet:{device_name}"
