"""Quantize an f16 GGUF with llama.cpp's own quantizer (`llama_model_quantize` of llama-cpp-python).

The metadata (tokenizer, chat template, `arenaflow.*` lineage) is copied by the quantizer. K-quants
pack rows in super-blocks of 256 values: a tensor whose rows are not a multiple of 256 (SmolLM2's
576-wide matrices, the tiny test model's 64) is quantized with llama.cpp's own fallback type for it
(q4_K -> q5_0, q6_K -> q8_0), which `tensor_types` shows and `quantize_gguf` logs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

QUANTIZATIONS = ("q8_0", "q4_k_m")  # model.quantization values (null: the f16 file)


def check_quantization(quantization: str | None) -> str | None:
    """model.quantization as given, when it is null, q8_0 or q4_k_m; ValueError otherwise."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"model.quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)} or null"
        )
    return quantization


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _ftype(quantization: str) -> int:
    import llama_cpp

    ftypes = {
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    }
    if quantization not in ftypes:
        raise ValueError(f"quantization={quantization!r} is not one of {', '.join(ftypes)}")
    return int(ftypes[quantization])


@contextlib.contextmanager
def _quiet_llama_cpp() -> Iterator[None]:
    """llama.cpp writes a line per tensor; keep its errors only while quantizing."""
    logger = logging.getLogger(
        "llama-cpp-python"
    )  # llama-cpp-python's log callback reads its level
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of a GGUF file are stored in each type, e.g. {"Q4_K": 60, "Q5_0": 150}."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in reader.tensors))


def quantize_gguf(src: str | Path, dst: str | Path, quantization: str) -> Path:
    """`dst`, the f16/f32 GGUF `src` quantized to `quantization` (q8_0 | q4_k_m) by llama.cpp; the
    file appears under its name only once complete. ImportError without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(
            f"quantizing to {quantization} needs llama-cpp-python (`make install` builds it)"
        ) from e
    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(quantization)
    partial = dst.with_name(f".{dst.name}.partial")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_llama_cpp():
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(partial).encode(), ctypes.byref(params)
        )
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quantization} (code {rc})")
    os.replace(partial, dst)
    types = tensor_types(dst)
    log.info(
        "quantized %s -> %s (%s, %.1f MB; tensor types %s)",
        src.name,
        dst,
        quantization,
        dst.stat().st_size / 1e6,
        types,
    )
    return dst
