"""Start-up memory check: estimate what the served models need, from their files, before loading any.

A set of models that cannot fit should fail in a second with a message that says why, not after
minutes of loading with an out-of-memory kill. The estimate reads only `config.json` and the
safetensors headers; the available memory is the GPU's free memory (`torch.cuda.mem_get_info`)
when serving on GPU, else the available RAM (psutil), or `serve.memory_budget_bytes` when set.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from arenaflow.adapters import is_adapter
from arenaflow.serve.errors import ServeConfigError

log = logging.getLogger(__name__)

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


class ModelsDoNotFitError(ServeConfigError):
    """The configured models need more memory than the server may use; raised before loading."""


@dataclass
class ModelMemory:
    """One model's estimate: weights in the serving dtype plus a full KV cache."""

    name: str
    weights_bytes: int
    kv_cache_bytes: int
    dtype: str
    context_length: int
    max_batch_size: int
    preloaded: bool = False  # already in memory (passed to create_app), so not checked again

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    def describe(self) -> str:
        return (
            f"{self.name!r} {gib(self.total_bytes)} (weights {gib(self.weights_bytes)} + KV cache "
            f"{gib(self.kv_cache_bytes)} for {self.max_batch_size} rows x {self.context_length} "
            f"tokens, {self.dtype})"
        )


@dataclass
class MemoryPlan:
    """The estimates of all served models against the memory the server may use."""

    models: list[ModelMemory]
    available_bytes: int
    available_source: str
    headroom: float
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(m.total_bytes for m in self.models)

    @property
    def to_load_bytes(self) -> int:
        return sum(m.total_bytes for m in self.models if not m.preloaded)

    @property
    def budget_bytes(self) -> int:
        return int(self.available_bytes * self.headroom)

    @property
    def fits(self) -> bool:
        return self.to_load_bytes <= self.budget_bytes

    def summary(self) -> str:
        per_model = "; ".join(m.describe() for m in self.models)
        return (
            f"{len(self.models)} model(s) need an estimated {gib(self.total_bytes)} "
            f"({per_model}); usable: {gib(self.budget_bytes)} = {self.headroom:g} x "
            f"{gib(self.available_bytes)} available ({self.available_source})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "total_estimate_bytes": self.total_bytes,
            "available_bytes": self.available_bytes,
            "available_source": self.available_source,
            "headroom": self.headroom,
            "budget_bytes": self.budget_bytes,
            "models": {m.name: {**asdict(m), "total_bytes": m.total_bytes} for m in self.models},
        }


def gib(n: int | float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def serving_dtype(cfg: DictConfig) -> tuple[str, str]:
    """(dtype, device) as `load_engine` uses them: fp32 on CPU, the hardware's dtype on GPU."""
    if cfg.hardware.accelerator == "gpu":
        return str(cfg.hardware.dtype), "cuda"
    return "float32", "cpu"


def estimate_model_memory(
    name: str, path: str | Path, *, dtype: str, max_batch_size: int
) -> ModelMemory:
    """Bytes to serve the checkpoint at `path`, from its files alone.

    weights  = parameters x bytes(dtype), parameters counted from the safetensors headers
               (shape products; pytorch .bin files: size / bytes of config.torch_dtype)
    KV cache = 2 (K and V) x num_hidden_layers x num_key_value_heads x head_dim
               x context_length x max_batch_size x bytes(dtype)
    where head_dim = config.head_dim or hidden_size / num_attention_heads and context_length =
    config.max_position_embeddings (the engine's window), i.e. every batch row at a full window.
    Activations and the allocator's slack are what `serve.memory_headroom` leaves room for.
    """
    path = Path(path)
    if dtype not in DTYPE_BYTES:
        raise ServeConfigError(f"unknown serving dtype {dtype!r}; one of {sorted(DTYPE_BYTES)}")
    nbytes = DTYPE_BYTES[dtype]
    config_file = path / "config.json"
    if not config_file.exists():
        raise ServeConfigError(f"model {name!r}: {path} has no config.json to estimate memory from")
    config = json.loads(config_file.read_text())
    text = config.get("text_config") or config  # multimodal configs nest the language model
    params = count_parameters(path, config)
    context = _context_length(path, text)
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(text, "num_attention_heads", "n_head")
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    kv_heads = _first(text, "num_key_value_heads", "multi_query_group_num") or heads
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise ServeConfigError(
            f"model {name!r}: cannot size the KV cache from {config_file} (needs the number of "
            "layers, attention heads and hidden size)"
        )
    kv = 2 * layers * kv_heads * head_dim * context * max_batch_size * nbytes
    return ModelMemory(
        name=name,
        weights_bytes=params * nbytes,
        kv_cache_bytes=kv,
        dtype=dtype,
        context_length=context,
        max_batch_size=max_batch_size,
    )


# Bytes per weight in the GGUF formats llama.cpp loads: q8_0 blocks are 34 bytes per 32 weights;
# q4_k_m is llama.cpp's mix of q4_K with q6_K for some tensors, about 4.9 bits a weight on
# Llama-shaped models. K-quants need rows a multiple of 256 wide; other rows fall back to q5_0 /
# q8_0 blocks, counted at q8_0's size (SmolLM2-135M's 576-wide rows are such).
GGUF_WEIGHT_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 4.9 / 8}
K_QUANT_ROW = 256


def estimate_llamacpp_memory(
    name: str,
    path: str | Path,
    *,
    quantization: str | None,
    n_ctx: int | None,
    max_batch_size: int,
    gguf: Path | None = None,
    kv_cache: str = "f32",
) -> ModelMemory:
    """Bytes to serve the checkpoint at `path` on llama.cpp, from its files alone.

    weights  = the size of `gguf` (engine.llamacpp.gguf) when given, else parameters x
               GGUF_WEIGHT_BYTES[format] (the export model.quantization picks)
    KV cache = 2 x layers x kv_heads x head_dim x n_ctx x max_batch_size x 4 (engine.llamacpp.
    kv_cache: f32; 2 for f16), where n_ctx is
    engine.llamacpp.n_ctx capped at the trained context: llama.cpp allocates every row's stream up
    front, so the whole cache counts even while its pages are untouched. The logits buffer (512 x
    vocabulary floats) and compute buffers are what serve.memory_headroom leaves room for."""
    from arenaflow.engine.llamacpp_runtime import KV_CACHE_BYTES
    from arenaflow.export import gguf_format

    fmt = gguf.name if gguf else gguf_format(quantization)
    base = estimate_model_memory(name, path, dtype="float32", max_batch_size=max_batch_size)
    if gguf:
        weights = gguf.stat().st_size
    else:
        shapes = _tensor_shapes(Path(path))
        weights = (
            sum(_gguf_tensor_bytes(s, fmt) for s in shapes)
            if shapes
            else (base.weights_bytes // 4 * GGUF_WEIGHT_BYTES[fmt])
        )
    context = min(base.context_length, n_ctx) if n_ctx else base.context_length
    per_token = base.kv_cache_bytes // (base.context_length * max_batch_size * 4)
    return ModelMemory(
        name=name,
        weights_bytes=int(weights),
        kv_cache_bytes=per_token * context * max_batch_size * KV_CACHE_BYTES[kv_cache],
        dtype=f"llama.cpp {fmt}",
        context_length=context,
        max_batch_size=max_batch_size,
    )


def _gguf_tensor_bytes(shape: list[int], fmt: str) -> float:
    """A tensor's bytes in a GGUF of format `fmt`: 1-D tensors (norms, biases) stay f32."""
    n = math.prod(shape)
    if len(shape) < 2:
        return 4 * n
    if fmt == "q4_k_m" and shape[-1] % K_QUANT_ROW:
        return n * GGUF_WEIGHT_BYTES["q8_0"]
    return n * GGUF_WEIGHT_BYTES[fmt]


def count_parameters(path: Path, config: dict[str, Any]) -> int:
    """Parameters stored in a checkpoint folder, without loading a tensor."""
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return sum(_safetensors_numel(f) for f in shards)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        stored = DTYPE_BYTES.get(
            str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4
        )
        return sum(f.stat().st_size for f in bins) // stored
    raise ServeConfigError(
        f"{path} has no *.safetensors or pytorch_model*.bin weights to estimate memory from"
    )


def _safetensors_header(file: Path) -> dict[str, Any]:
    with file.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(header_len))


def _tensor_shapes(path: Path) -> list[list[int]]:
    """The shapes of a checkpoint's safetensors tensors (none for pytorch .bin weights)."""
    return [
        info["shape"]
        for f in sorted(path.glob("*.safetensors"))
        for key, info in _safetensors_header(f).items()
        if key != "__metadata__"
    ]


def _safetensors_numel(file: Path) -> int:
    header = _safetensors_header(file)
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_BYTES:
            start, end = info["data_offsets"]  # unknown element type: count bytes as elements
            total += end - start
            continue
        total += math.prod(info["shape"])
    return total


def _first(config: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        if config.get(k):
            return int(config[k])
    return None


def _context_length(path: Path, config: dict[str, Any]) -> int:
    """The engine's window: max_position_embeddings, else the tokenizer's limit, else 2048."""
    n = _first(config, "max_position_embeddings", "n_positions", "max_sequence_length")
    if n:
        return n
    tok = path / "tokenizer_config.json"
    if tok.exists():
        limit = json.loads(tok.read_text()).get("model_max_length")
        if isinstance(limit, int | float) and 0 < limit < 10**7:
            return int(limit)
    return 2048


def available_memory(cfg: DictConfig) -> tuple[int, str]:
    """(bytes, where the number comes from): the configured budget, free GPU memory or free RAM."""
    budget = cfg.serve.get("memory_budget_bytes")
    if budget is not None:
        if float(budget) <= 0:
            raise ServeConfigError(f"serve.memory_budget_bytes must be > 0, got {budget}")
        return int(float(budget)), "serve.memory_budget_bytes"
    _, device = serving_dtype(cfg)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ServeConfigError(
                "hardware.accelerator=gpu but CUDA is not available; use hardware=cpu"
            )
        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free memory of {torch.cuda.get_device_name()}"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM"


def plan_memory(
    cfg: DictConfig,
    paths: dict[str, Path],
    preloaded: set[str] | frozenset[str] = frozenset(),
    on_hf: set[str] | frozenset[str] = frozenset(),
) -> MemoryPlan:
    """Estimate every model (name -> checkpoint folder) against the usable memory, each on the
    engine it loads on: llama.cpp where engine.backend picks it (but the names `on_hf`, and
    adapters), else the hf engine."""
    headroom = float(cfg.serve.get("memory_headroom", 0.9))
    if not 0 < headroom <= 1:
        raise ServeConfigError(
            f"serve.memory_headroom must be in (0, 1] (the share of available memory the "
            f"models may use), got {headroom}"
        )
    dtype, device = serving_dtype(cfg)
    batch = int(cfg.serve.max_batch_size)
    models = []
    llamacpp = llamacpp_options(cfg)
    for name, path in paths.items():
        if llamacpp is not None and name not in on_hf and not is_adapter(Path(path)):
            m = estimate_llamacpp_memory(name, path, max_batch_size=batch, **llamacpp)
        else:
            m = estimate_model_memory(name, path, dtype=dtype, max_batch_size=batch)
        m.preloaded = name in preloaded
        models.append(m)
    available, source = available_memory(cfg)
    plan = MemoryPlan(models, available, source, headroom, device)
    if preloaded:
        plan.notes.append(
            f"already loaded, not checked: {sorted(preloaded)} (the available memory excludes them)"
        )
    return plan


def llamacpp_options(cfg: DictConfig) -> dict[str, Any] | None:
    """What sizes a model on llama.cpp, when engine.backend picks it here; else None."""
    from arenaflow.engine.backends import EngineSpec, choose_backend

    try:
        spec = EngineSpec.from_cfg(cfg)
        if choose_backend(spec.backend, spec.device) != "llamacpp":
            return None
    except ValueError as e:
        raise ServeConfigError(str(e)) from e
    gguf = spec.llamacpp.get("gguf")
    return {
        "quantization": spec.quantization,
        "n_ctx": spec.llamacpp.get("n_ctx"),
        "gguf": Path(gguf) if gguf else None,
        "kv_cache": spec.llamacpp.get("kv_cache") or "f32",
    }


def check_memory(plan: MemoryPlan) -> None:
    """Log the plan; raise ModelsDoNotFitError naming every model when the set does not fit."""
    if plan.fits:
        log.info("memory: %s", plan.summary())
        return
    raise ModelsDoNotFitError(
        f"the served models do not fit in memory: {plan.summary()}; the models to load need "
        f"{gib(plan.to_load_bytes)} > {gib(plan.budget_bytes)} usable. Serve fewer models "
        "(serve.models), lower serve.max_batch_size"
        + (
            ", lower engine.llamacpp.n_ctx, set engine.llamacpp.kv_cache=f16 (half the KV cache)"
            if any(m.dtype.startswith("llama.cpp") for m in plan.models)
            else ""
        )
        + ", or raise serve.memory_headroom / serve.memory_budget_bytes"
    )
