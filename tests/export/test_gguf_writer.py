"""The GGUF writer on the tiny Llama: keys, tensors, tokenizer and chat template, read back with
`gguf.GGUFReader` (no llama.cpp needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arenaflow.export.gguf import pre_tokenizer_name, rope_interleave
from arenaflow.models import load_model, load_tokenizer


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def reader(tiny_gguf):
    """The file read back once (the reader parses ~100k tokenizer strings one by one)."""
    import gguf

    return gguf.GGUFReader(str(tiny_gguf))


def test_rope_interleave_puts_each_half_split_pair_side_by_side() -> None:
    # one head of dim 4: HF pairs rows (0, 2) and (1, 3); llama.cpp wants them as (0, 1), (2, 3)
    w = np.arange(8).reshape(8, 1)  # two heads
    assert rope_interleave(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ValueError, match="rope heads"):
        rope_interleave(np.zeros((6, 1)), 2)


def test_pre_tokenizer_name_follows_the_tokenizer_json_layout() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    seq = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": seq}) == "smollm"
    with pytest.raises(ValueError, match="pass pre="):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_tiny_llama_gguf_holds_hparams_tokenizer_template_and_lineage(
    reader, tiny_model_dir
) -> None:
    import gguf

    tok = load_tokenizer(tiny_model_dir)
    assert _field(reader, "general.architecture") == "llama"
    expected = {
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.context_length": 2048,
        "llama.vocab_size": len(tok),
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = _field(reader, "tokenizer.ggml.token_type")
    specials = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == specials
    assert len(_field(reader, "tokenizer.ggml.merges")) > 40_000
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False  # as the HF tokenizer does
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert _field(reader, "arenaflow.base_model") == "tiny-llama"
    assert _field(reader, "arenaflow.data_hash") == "0123456789abcdef"


def test_tiny_llama_gguf_tensors_are_named_shaped_and_rope_reordered(
    reader, tiny_model_dir
) -> None:
    import gguf

    tensors = {t.name: t for t in reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
    per_block += ["ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {f"blk.{b}.{n}.weight" for b in range(2) for n in per_block}
    # tied embeddings: no output.weight, llama.cpp reuses token_embd
    assert set(tensors) == names | {"token_embd.weight", "output_norm.weight"}
    assert tensors["token_embd.weight"].shape.tolist() == [64, 49152]  # GGUF order: cols first
    assert tensors["blk.0.attn_k.weight"].shape.tolist() == [64, 32]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    state = load_model(tiny_model_dir).state_dict()
    for hf, ours, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        hf_w = state[f"model.layers.1.self_attn.{hf}.weight"].numpy()
        written = np.asarray(tensors[f"blk.1.{ours}.weight"].data).reshape(hf_w.shape)
        np.testing.assert_array_equal(written, rope_interleave(hf_w, heads).astype(np.float16))
        assert not np.array_equal(written, hf_w.astype(np.float16))  # reordered, not as is
    v = state["model.layers.0.self_attn.v_proj.weight"].to(torch.float16).numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data), v)


def test_writer_refuses_a_checkpoint_it_cannot_write(tmp_path, tiny_model_dir) -> None:
    from arenaflow.export import write_gguf

    with pytest.raises(ValueError, match="outtype"):
        write_gguf(tiny_model_dir, tmp_path / "x.gguf", outtype="q4_0")
    assert not list(tmp_path.iterdir())


def test_bf16_file_holds_the_weights_rounded_as_torch_rounds_them(tiny_model_dir, tmp_path) -> None:
    """bf16 matrices are the checkpoint's own weights rounded to bf16 (as torch rounds them, not
    through the f16 file), norms stay f32, and the file says it is bf16."""
    import gguf

    from arenaflow.export import write_gguf

    path = write_gguf(tiny_model_dir, tmp_path / "tiny-bf16.gguf", outtype="bf16")
    reader = gguf.GGUFReader(str(path))
    assert int(_field(reader, "general.file_type")) == int(gguf.LlamaFileType.MOSTLY_BF16)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.BF16
    weight = load_model(tiny_model_dir).state_dict()["model.layers.0.mlp.down_proj.weight"]
    want = weight.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = np.asarray(down.data).view(np.uint16).reshape(want.shape)
    assert np.array_equal(got, want)
