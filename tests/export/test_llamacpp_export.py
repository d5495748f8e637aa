"""The exported GGUF on llama.cpp itself (llama-cpp-python): the f16 file computes what the hf
engine computes, and llama.cpp's quantizer makes smaller files that still load and chat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from arenaflow.engine import Engine, SamplingParams  # noqa: E402
from arenaflow.export import quantize_gguf  # noqa: E402
from arenaflow.export.quantize import tensor_types  # noqa: E402

CHATS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "user", "content": "What is 12 * 7? Answer with digits: 84."}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
]
NEW_TOKENS = 12


@pytest.fixture(autouse=True)
def no_repacked_weights(monkeypatch):
    """This llama.cpp build (GGML_NATIVE, AMX_INT8) faults with an invalid opcode (`tilezero`)
    in its AMX kernels for quantized weights on a multi-token batch on this VM; loading without
    llama.cpp's extra (repacked / AMX) buffer types avoids them."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)


def _llama(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False
    )


def _greedy(llm: llama_cpp.Llama, ids: list[int], n: int, eos: set[int]) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token in eos or len(out) == n:
            break
        out.append(token)
    return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(tiny_model_dir)


def test_llama_cpp_on_the_f16_file_matches_the_hf_engine(tiny_gguf, engine) -> None:
    llm = _llama(tiny_gguf)
    try:
        for chat in CHATS:
            prompt = engine.render_chat(chat)
            ids = engine.encode(prompt)
            # the same rendered prompt gives the same ids in both tokenizers (no template drift)
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
            hf = engine.generate([prompt], SamplingParams(max_new_tokens=NEW_TOKENS))
            want = [t for t in hf[0].choices[0].token_ids if t not in engine.eos_ids]
            assert _greedy(llm, ids, NEW_TOKENS, engine.eos_ids) == want
        # every position's logits, not only the argmax: a wrong rope layout of q/k is ~20x off
        import torch

        ids = engine.encode(engine.render_chat(CHATS[2]))
        with torch.no_grad():
            ref = engine.model(torch.tensor([ids])).logits[0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
        assert np.abs(got - ref).max() < 0.01 * ref.std()
    finally:
        llm.close()


def test_quantized_files_are_smaller_load_and_keep_tokenizer_and_lineage(
    tiny_gguf, engine, tmp_path
) -> None:
    f16_size = tiny_gguf.stat().st_size
    prompt = engine.render_chat(CHATS[0])
    ids = engine.encode(prompt)
    for quantization, expected in (("q8_0", {"Q8_0"}), ("q4_k_m", {"Q5_0", "Q8_0"})):
        out = quantize_gguf(tiny_gguf, tmp_path / f"tiny-{quantization}.gguf", quantization)
        assert out.stat().st_size < 0.8 * f16_size
        # the tiny model's 64-wide rows are no multiple of 256: llama.cpp's k-quant fallbacks
        assert set(tensor_types(out)) - {"F32"} == expected
        llm = _llama(out)
        try:
            assert llm.metadata["tokenizer.chat_template"] == engine.tokenizer.chat_template
            assert llm.metadata["arenaflow.base_model"] == "tiny-llama"
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
            assert len(_greedy(llm, ids, NEW_TOKENS, set())) == NEW_TOKENS
        finally:
            llm.close()
    assert not list(tmp_path.glob(".*partial"))


def test_quantize_refuses_an_unknown_quantization(tiny_gguf, tmp_path) -> None:
    with pytest.raises(ValueError, match="q8_0, q4_k_m"):
        quantize_gguf(tiny_gguf, tmp_path / "x.gguf", "q3_k")


def test_an_f32_kv_cache_keeps_llama_cpp_closer_to_the_hf_engine(tiny_gguf, engine) -> None:
    """engine.llamacpp.kv_cache: the same f16 file's next-token distribution after a long chat
    is nearer the hf engine's (over the same f16-rounded weights) with the KV cache in f32 than in
    f16."""
    import copy

    import torch

    from arenaflow.engine.llamacpp import LlamaCppEngine

    chat = [{"role": "user", "content": " ".join(c[-1]["content"] for c in CHATS) * 6}]
    ids = engine.encode(engine.render_chat(chat))
    rounded = copy.deepcopy(engine.model)  # the weights the f16 file holds
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
        ref = torch.log_softmax(rounded(torch.tensor([ids])).logits[0, -1].float(), -1)
    gaps, state = {}, {}
    for kv in ("f32", "f16"):
        llama = LlamaCppEngine(
            tiny_gguf, engine.tokenizer, model_id="t", max_batch_size=1, n_ctx=512, kv_cache=kv
        )
        try:
            gaps[kv] = float((llama.next_token_logprobs(ids) - ref).abs().max())
            rt = llama.runtime
            state[kv] = rt.lc.llama_state_seq_get_size(rt.ctx, 0)  # the stream's KV, in bytes
        finally:
            llama.close()
    assert gaps["f32"] < gaps["f16"]
    assert 1.9 < state["f32"] / state["f16"] < 2.1  # 4-byte elements against 2-byte ones


def test_the_bf16_file_runs_close_to_the_f16_file(tiny_model_dir, tiny_gguf, tmp_path) -> None:
    """llama.cpp reads the bf16 export; its next-token distribution stays near the f16 file's (bf16
    keeps 8 bits of mantissa against f16's 11, so not equal)."""
    from arenaflow.export import export_gguf

    files = export_gguf(tiny_model_dir, tmp_path, ["bf16"])  # model.gguf_export: [bf16]
    assert list(files) == ["bf16"] and [p.name for p in tmp_path.iterdir()] == ["model-bf16.gguf"]
    bf16 = files["bf16"]
    assert set(tensor_types(bf16)) == {"F32", "BF16"}
    ids = [1, 415, 3327, 282, 2012, 314]

    def last_logits(path: Path) -> np.ndarray:
        llm = _llama(path)
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1])

    a, b = last_logits(tiny_gguf), last_logits(bf16)
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max()
