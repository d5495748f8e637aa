"""The server's memory plan on llama.cpp: each model's GGUF weights and llama.cpp's KV cache (f32 or
f16, engine.llamacpp.kv_cache) at engine.llamacpp.n_ctx, checked against the sizes llama.cpp itself reports for the real exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from arenaflow.config import compose_config  # noqa: E402
from arenaflow.serve.memory import plan_memory  # noqa: E402


@pytest.fixture(scope="module")
def exports(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from arenaflow.export.gguf import write_gguf
    from arenaflow.export.quantize import quantize_gguf

    folder = tmp_path_factory.mktemp("plan-gguf")
    f16 = write_gguf(tiny_model_dir, folder / "tiny-f16.gguf")
    out = {"f16": f16}
    for fmt in ("q8_0", "q4_k_m"):
        out[fmt] = quantize_gguf(f16, folder / f"tiny-{fmt}.gguf", fmt)
    return out


def _cfg(home: Path, model: Path, *overrides: str):
    return compose_config(
        [
            "experiment=test",
            f"paths.home={home}",
            "tracking=none",
            f"serve.model_uri={model}",
            "serve.max_batch_size=4",
            "serve.memory_budget_bytes=1e12",
            *overrides,
        ]
    )


def _model_size(gguf: Path) -> int:
    """The bytes of weights llama.cpp holds for a GGUF (llama_model_size)."""
    import llama_cpp as lc

    params = lc.llama_model_default_params()
    params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(str(gguf).encode(), params)
    try:
        return int(lc.llama_model_size(model))
    finally:
        lc.llama_model_free(model)


@pytest.mark.parametrize(("fmt", "kv"), [("f16", "f32"), ("q8_0", "f16"), ("q4_k_m", "f32")])
def test_llamacpp_plan_counts_the_gguf_weights_and_the_kv_cache(
    tiny_model_dir: Path, tmp_path: Path, exports: dict[str, Path], fmt: str, kv: str
) -> None:
    quant = "null" if fmt == "f16" else fmt
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "engine.backend=llamacpp",
        "engine.llamacpp.n_ctx=256",
        f"engine.llamacpp.kv_cache={kv}",
        f"model.quantization={quant}",
    )
    [m] = plan_memory(cfg, {"tiny": tiny_model_dir}).models
    real = _model_size(exports[fmt])
    # never under llama.cpp's own size, and within 40% of it (the tiny model's 64-wide rows fall
    # back to q5_0 / q8_0 blocks in q4_k_m, counted at the conservative 5.5 bits)
    assert real <= m.weights_bytes <= 1.4 * real, (fmt, m.weights_bytes, real)
    c = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim  # K+V elements
    per_token *= {"f32": 4, "f16": 2}[kv]
    assert m.kv_cache_bytes == per_token * min(256, c["max_position_embeddings"]) * 4
    assert m.context_length == min(256, c["max_position_embeddings"])
    assert m.dtype == f"llama.cpp {fmt}"

    hf = plan_memory(_cfg(tmp_path, tiny_model_dir, "engine.backend=hf"), {"tiny": tiny_model_dir})
    assert hf.models[0].dtype == "float32" and hf.models[0].weights_bytes > m.weights_bytes


def test_a_given_gguf_is_counted_at_its_file_size(
    tiny_model_dir: Path, tmp_path: Path, exports: dict[str, Path]
) -> None:
    gguf = exports["q8_0"]
    cfg = _cfg(tmp_path, tiny_model_dir, "engine.backend=llamacpp", f"engine.llamacpp.gguf={gguf}")
    [m] = plan_memory(cfg, {"tiny": tiny_model_dir}).models
    assert m.weights_bytes == gguf.stat().st_size
    # names that run on the hf engine (a shared base with its adapters) keep the hf estimate
    [base] = plan_memory(cfg, {"tiny": tiny_model_dir}, on_hf={"tiny"}).models
    assert base.dtype == "float32"
