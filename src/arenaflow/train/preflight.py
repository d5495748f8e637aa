"""Memory preflight: refuse a training target that cannot fit before any process starts.

Per-rank estimate for AdamW training with fp32 master weights (what Lightning's mixed precision
keeps): weights 4 B, gradients 4 B, optimizer moments 8 B per parameter, divided by the world
size under FSDP (plus one gathered layer), and activations after Korthikanti et al. (2022):
s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, one layer's worth plus the layer inputs when
activation checkpointing is on, and the fp32 logits with their gradient.

LoRA (`trainable` given): gradients and optimizer moments exist for the adapter parameters only,
and the frozen base takes 4 B per parameter, or for QLoRA (`quantized`) ~0.53 B per decoder
parameter (4-bit NF4 plus its double-quantized block scales) with the embeddings kept in fp32;
under FSDP2 every rank holds those 4-bit weights whole (they are not sharded).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from arenaflow.train.flops import ModelShape, sixteen_bit

log = logging.getLogger(__name__)

GiB = 1024**3
HEADROOM = 0.9  # keep 10% for the allocator, CUDA context, buffers
NF4_BYTES = 0.5 + 0.03  # 4 bits per weight + fp8 block scales per 64 (double quantization)


class MemoryPreflightError(RuntimeError):
    """The chosen hardware target cannot hold this training run."""


@dataclass
class MemoryEstimate:
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    available_gb: float
    world_size: int

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def estimate_memory(
    shape: ModelShape,
    hardware: Any,
    max_length: int,
    trainable: int | None = None,
    quantized: bool = False,
) -> MemoryEstimate:
    """Per-device memory: weights, gradients, optimizer states and activations.

    `trainable`: the parameters that train (LoRA's adapters; default all of them)."""
    world = int(hardware.devices) * int(hardware.num_nodes)
    shards = world if hardware.strategy == "fsdp" else 1
    p = shape.n_params
    t = p if trainable is None else trainable
    embed = shape.vocab_size * shape.hidden_size
    layer_params = (p - embed) / max(shape.n_layers, 1)
    adapters = (t if trainable is not None else 0) * 4
    if quantized:  # FSDP2 leaves bitsandbytes' 4-bit weights out: every rank holds them whole
        params = (p - embed) * NF4_BYTES + (embed * 4 + adapters) / shards
    else:
        gathered = layer_params * 4 * 2 if shards > 1 else 0  # one layer all-gathered (+ prefetch)
        params = (p * 4 + adapters) / shards + gathered
    grads = t * 4 / shards
    optimizer = t * 8 / shards
    act_bytes = 2 if sixteen_bit(hardware.precision) else 4
    s, b, h, a = max_length, int(hardware.micro_batch_size), shape.hidden_size, shape.n_heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * act_bytes / 2
    if hardware.activation_checkpointing:
        acts = shape.n_layers * s * b * h * act_bytes + per_layer
    else:
        acts = shape.n_layers * per_layer
    acts += s * b * shape.vocab_size * 4 * 3  # fp32 logits, log-softmax, gradient
    total = params + grads + optimizer + acts
    return MemoryEstimate(
        params_gb=params / GiB,
        grads_gb=grads / GiB,
        optimizer_gb=optimizer / GiB,
        activations_gb=acts / GiB,
        total_gb=total / GiB,
        available_gb=float(hardware.memory_per_device_gb),
        world_size=world,
    )


def check_accelerator(hardware: Any) -> None:
    """A GPU target on a machine where torch sees no GPU stops before anything is built."""
    import torch

    if hardware.accelerator == "gpu" and not torch.cuda.is_available():
        raise RuntimeError(
            f"hardware.accelerator=gpu, but torch {torch.__version__} sees no CUDA GPU on this "
            "machine; pick a CPU target (hardware=cpu or hardware=cpu_fsdp) or run on a GPU "
            "machine with a CUDA build of torch"
        )


def check_memory(
    shape: ModelShape,
    hardware: Any,
    max_length: int,
    model_name: str,
    trainable: int | None = None,
    quantized: bool = False,
) -> MemoryEstimate:
    """Raise `MemoryPreflightError` naming the numbers and the fixes when the run cannot fit."""
    est = estimate_memory(shape, hardware, max_length, trainable, quantized)
    log.info("memory preflight (GiB per device): %s", est.as_dict())
    if est.total_gb > est.available_gb * HEADROOM:
        raise MemoryPreflightError(
            f"memory preflight: training {model_name} ({shape.n_params / 1e9:.2f}B params) needs "
            f"~{est.total_gb:.1f} GiB per device (weights {est.params_gb:.1f}, grads "
            f"{est.grads_gb:.1f}, optimizer {est.optimizer_gb:.1f}, activations "
            f"{est.activations_gb:.1f}) with strategy={hardware.strategy} on {est.world_size} "
            f"device(s), more than {HEADROOM:.0%} of hardware.memory_per_device_gb="
            f"{est.available_gb:g}. Fix: pick a sharded target with more devices (e.g. "
            f"hardware=a100_4x or hardware=h100_8x), lower hardware.micro_batch_size, set "
            f"hardware.activation_checkpointing=true, lower train.max_length or train LoRA "
            f"adapters (train=lora, train=qlora) "
            f"(train.preflight=false skips this check)."
        )
    return est
