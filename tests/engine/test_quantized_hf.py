"""model.quantization on the hf engine: 8-bit (LLM.int8) and 4-bit NF4 weights through bitsandbytes,
as FastChat's --load-8bit; the same requests and results as full-precision weights."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

from arenaflow.engine import SamplingParams  # noqa: E402
from arenaflow.engine.backends import EngineSpec, load_engine  # noqa: E402

CHAT = [[{"role": "user", "content": "What is the capital of France?"}]]


def layer_bytes(engine) -> int:
    layers = engine.model.model.layers
    return sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])


@pytest.mark.parametrize(
    ("quantization", "layer"), [("q8_0", "Linear8bitLt"), ("q4_k_m", "Linear4bit")]
)
def test_quantized_weights_load_through_bitsandbytes_and_generate(
    tiny_model_dir: Path, quantization: str, layer: str
) -> None:
    full = load_engine(tiny_model_dir, EngineSpec(backend="hf"), max_batch_size=2)
    quant = load_engine(
        tiny_model_dir, EngineSpec(backend="hf", quantization=quantization), max_batch_size=2
    )
    kinds = {type(m).__name__ for m in quant.model.modules()}
    assert layer in kinds  # the projections really are bitsandbytes layers
    assert layer_bytes(quant) < 0.6 * layer_bytes(full)  # the decoder's weights shrank
    params = SamplingParams(max_new_tokens=8, logprobs=True)
    out = quant.chat(CHAT, params)[0]
    assert out.completion_tokens > 0 and out.choices[0].logprobs
    assert all(0 <= t < quant.model.config.vocab_size for t in out.choices[0].token_ids)


def test_an_unknown_quantization_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="model.quantization='q3'"):
        load_engine(tiny_model_dir, EngineSpec(backend="hf", quantization="q3"))
