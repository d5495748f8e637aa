"""Which engine loads a model reference: `engine.backend` (auto | hf | llamacpp | vllm).

`hf` is arenaflow's own engine (exact, portable); `llamacpp` runs the checkpoint's GGUF export in
llama.cpp; `vllm` hands batch generation to vLLM's offline `LLM` on a GPU. `auto` picks llama.cpp
on a CPU when it is installed, vLLM on a GPU when it is installed, else `hf`. Every backend is an
`Engine` (the same requests and results), so its callers never ask which one they hold.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arenaflow.engine.engine import Engine, resolve_checkpoint

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "llamacpp", "vllm")


@dataclass(frozen=True)
class EngineSpec:
    """How to load engines, read once from the config (`EngineSpec.from_cfg`)."""

    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str | None = None  # model.quantization: the GGUF llama.cpp loads (null: f16),
    # or bitsandbytes 8-/4-bit weights on the hf engine
    cache_dir: str | None = None  # where GGUF exports are cached (paths.cache_dir)
    llamacpp: dict[str, Any] = field(default_factory=dict)  # engine.llamacpp

    @classmethod
    def from_cfg(cls, cfg: Any) -> EngineSpec:
        from omegaconf import OmegaConf

        from arenaflow.engine.llamacpp_runtime import check_kv_cache
        from arenaflow.export.quantize import check_quantization

        gpu = cfg.hardware.accelerator == "gpu"
        engine = cfg.get("engine") or {}
        kv = (engine.get("llamacpp") or {}).get("kv_cache")
        if kv is not None:  # a typo is an error here (as in model.quantization), not a fall-back
            check_kv_cache(kv)
        return cls(
            backend=str(engine.get("backend", "auto")),
            device="cuda" if gpu else "cpu",
            dtype=str(cfg.hardware.dtype) if gpu else "float32",
            quantization=check_quantization(cfg.model.quantization),
            cache_dir=str(cfg.paths.cache_dir),
            llamacpp=OmegaConf.to_container(engine.get("llamacpp") or {}, resolve=True),
        )


def llamacpp_available() -> bool:
    from arenaflow.engine.llamacpp_runtime import available

    return available()


def vllm_available() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def choose_backend(backend: str, device: str = "cpu") -> str:
    """The backend `backend` names on `device` (`auto` resolved); ValueError with the fix when
    it is unknown or not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"engine.backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.startswith("cuda"):
            return "vllm" if vllm_available() else "hf"
        return "llamacpp" if llamacpp_available() else "hf"
    if backend == "llamacpp" and not llamacpp_available():
        raise ValueError(
            "engine.backend=llamacpp but llama-cpp-python is not installed (`make install` builds "
            "it); or use engine.backend=hf"
        )
    if backend == "vllm" and not vllm_available():
        raise ValueError(
            "engine.backend=vllm needs vLLM and a CUDA GPU (pip install vllm on a GPU machine); "
            "or use engine.backend=hf"
        )
    return backend


def engine_identity(spec: EngineSpec) -> str:
    """What runs a local model, for cache keys: the backend `spec` resolves to on its device and
    the weights it reads. Answers and verdicts from another engine or precision are other results,
    so they are never reused in its place."""
    backend = choose_backend(spec.backend, spec.device)
    if backend == "llamacpp":
        kv = spec.llamacpp.get("kv_cache") or "f32"
        return f"llamacpp:{spec.quantization or 'f16'}:kv-{kv}"
    quantized = f":{spec.quantization}" if spec.quantization and backend == "hf" else ""
    return f"{backend}:{spec.dtype}{quantized}"


def load_engine(
    ref: str | Path,
    spec: EngineSpec | None = None,
    *,
    tracking_uri: str | None = None,
    max_batch_size: int = 16,
) -> Engine:
    """The engine of a checkpoint folder or registry URI on the backend `spec` picks.

    `auto` serves a checkpoint that has no GGUF export (an architecture or tokenizer the writer
    does not take, an adapter llama.cpp cannot apply) on `hf`, saying so; an explicit `llamacpp`
    raises."""
    spec = spec or EngineSpec()
    backend = choose_backend(spec.backend, spec.device)
    if backend == "llamacpp":
        try:
            return _load_llamacpp(ref, spec, tracking_uri, max_batch_size)
        except (ValueError, NotImplementedError, ImportError) as e:
            if spec.backend != "auto":
                raise
            log.warning("%s stays on the hf engine: no llama.cpp model for it (%s)", ref, e)
    if backend == "vllm":
        from arenaflow.engine.vllm import VllmEngine

        return VllmEngine.load(ref, dtype=spec.dtype, tracking_uri=tracking_uri)
    return Engine.load(
        ref,
        dtype=spec.dtype,
        device=spec.device,
        tracking_uri=tracking_uri,
        max_batch_size=max_batch_size,
        quantization=spec.quantization,
    )


def _load_llamacpp(
    ref: str | Path, spec: EngineSpec, tracking_uri: str | None, max_batch_size: int
) -> Engine:
    from arenaflow.engine.llamacpp import LlamaCppEngine

    return LlamaCppEngine.load(
        resolve_checkpoint(ref, tracking_uri),
        tracking_uri=tracking_uri,
        max_batch_size=max_batch_size,
        quantization=spec.quantization,
        cache_dir=spec.cache_dir,
        **spec.llamacpp,
    )


def gguf_for(
    checkpoint: Path,
    quantization: str | None = None,
    cache_dir: str | Path | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """The GGUF llama.cpp loads for a checkpoint folder: its export at `quantization`
    (`arenaflow.export.registry.resolve_gguf`: converted once, cached under `cache_dir/gguf`)."""
    from arenaflow.export.registry import resolve_gguf

    cache = Path(cache_dir) if cache_dir else checkpoint.parent
    tracker = None
    if tracking_uri:
        from arenaflow.tracking import MlflowTracker

        tracker = MlflowTracker(tracking_uri, "arenaflow")
    return resolve_gguf(checkpoint, quantization, cache, tracker=tracker)
