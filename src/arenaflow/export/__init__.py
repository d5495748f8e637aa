"""GGUF files of our checkpoints, for llama.cpp (and ollama, LM Studio, ...).

- `gguf.write_gguf`: a Hugging Face Llama checkpoint -> one f16 (bf16, f32) GGUF file, tokenizer,
  chat template and lineage inside, written with the `gguf` package.
- `quantize.quantize_gguf`: f16 -> q8_0 / q4_k_m with llama.cpp's own quantizer (llama-cpp-python).
- `export_gguf`: a checkpoint -> the files of `model.gguf_export` in one folder.
- `registry`: the GGUF files of a registered version (`attach_gguf` at registration, as artifacts of
  the version's run under `gguf/`, tagged `arenaflow.gguf.<format>` on the version) and
  `resolve_gguf`, the one answer to "which GGUF file does the llama.cpp backend load for this
  checkpoint and `model.quantization`?".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from arenaflow.export.gguf import write_gguf
from arenaflow.export.quantize import (
    QUANTIZATIONS,
    check_quantization,
    llama_cpp_available,
    quantize_gguf,
)

log = logging.getLogger(__name__)

FORMATS = ("f16", "bf16", *QUANTIZATIONS)  # what model.gguf_export may list
WRITTEN = ("f16", "bf16")  # written from the weights; the others are quantized from the f16 file


def gguf_format(quantization: str | None) -> str:
    """The GGUF format a `model.quantization` value selects: null -> f16, else q8_0 | q4_k_m;
    `bf16` (never a model.quantization: the local judge picks it where the CPU has bf16) itself."""
    if quantization == "bf16":
        return quantization
    return str(check_quantization(quantization) or "f16")


def check_formats(formats: Iterable[str]) -> list[str]:
    """`model.gguf_export` as a list, each a known format (ValueError naming the bad one)."""
    out = [str(f) for f in formats]
    bad = [f for f in out if f not in FORMATS]
    if bad:
        raise ValueError(f"model.gguf_export: {bad} not among {', '.join(FORMATS)}")
    return out


def gguf_name(fmt: str, stem: str = "model") -> str:
    return f"{stem}-{fmt}.gguf"


def export_gguf(
    checkpoint: str | Path,
    out_dir: str | Path,
    formats: Iterable[str] = FORMATS,
    *,
    metadata: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Path]:
    """The GGUF files of `checkpoint` in `out_dir` (`model-<format>.gguf`), one per format: f16
    written from the weights, each quantized format from that f16 file. Quantized formats need
    llama-cpp-python; without it they are left out with a warning (the f16 file is still written)."""
    wanted = check_formats(formats)
    if not wanted:
        return {}
    out_dir = Path(out_dir)
    quantized = [f for f in wanted if f not in WRITTEN]
    if quantized and not llama_cpp_available():
        log.warning(
            "GGUF %s not written: quantizing needs llama-cpp-python (`make install`)",
            ", ".join(quantized),
        )
        quantized = []
    files: dict[str, Path] = {}
    for fmt in WRITTEN:  # from the weights, when wanted (f16 also as the quantizer's source)
        if fmt in wanted or (fmt == "f16" and quantized):
            out = out_dir / gguf_name(fmt)
            files[fmt] = write_gguf(
                checkpoint, out, outtype=fmt, metadata=metadata, tracking_uri=tracking_uri
            )
    for fmt in quantized:
        files[fmt] = quantize_gguf(files["f16"], out_dir / gguf_name(fmt), fmt)
    if "f16" not in wanted and "f16" in files:
        files.pop("f16").unlink()
    return files


__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "check_formats",
    "export_gguf",
    "gguf_format",
    "gguf_name",
    "llama_cpp_available",
    "quantize_gguf",
    "write_gguf",
]
