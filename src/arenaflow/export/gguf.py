"""Write a Hugging Face Llama checkpoint as a GGUF file (f16, bf16 or f32) with the `gguf` package.

The file holds what llama.cpp needs to run the model without the checkpoint folder: the
hyperparameters under `llama.*`, every tensor under its GGUF name (from `gguf`'s own
`TensorNameMap`), the BPE tokenizer (tokens, token types, merges, special ids, whether BOS is
added) with the chat template, and the lineage of the checkpoint as `arenaflow.*` strings.

Two layout facts of the format: GGUF stores a matrix with its dimensions reversed (the `gguf`
writer does that from numpy's row-major shape), and llama.cpp's `llama` architecture applies rope
to interleaved pairs (2i, 2i+1) of each head, as Meta's original weights do, while Hugging Face's
Llama rotates the two halves of each head (i, i + d/2). So the rows of `q_proj` and `k_proj` are
reordered per head from half-split to interleaved order; `v`, `o` and the MLP are written as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

OUTTYPES = ("f16", "bf16", "f32")  # what this writer produces; quantized types come from llama.cpp


def _file_type(outtype: str) -> int:
    import gguf

    types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "f32": "ALL_F32"}
    return int(getattr(gguf.LlamaFileType, types[outtype]))


def rope_interleave(weight: np.ndarray, n_head: int) -> np.ndarray:
    """q/k projection rows from Hugging Face's half-split rope order to llama.cpp's interleaved order.

    Within each head, HF row j < d/2 pairs with row j + d/2; llama.cpp pairs rows 2j and 2j+1, so
    row j goes to 2j and row j + d/2 to 2j + 1."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"a q/k projection of {rows} rows does not split into {n_head} rope heads")
    split = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def pre_tokenizer_name(tokenizer_json: Mapping[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json; ValueError for one
    it cannot be told from (pass `pre=` to `write_gguf` once you know which llama.cpp name fits)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_regex = [s.get("use_regex", True) for s in steps if s.get("type") == "ByteLevel"]
    if kinds == ["ByteLevel"] and byte_regex == [True]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_regex[0]:
        return "smollm"
    raise ValueError(
        f"cannot tell llama.cpp's name for the pre-tokenizer {json.dumps(pre)[:200]}; "
        "pass pre=<name> (llama.cpp's tokenizer.ggml.pre values: gpt-2, smollm, llama-bpe, ...)"
    )


def _token_types(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Every id's token text (byte-level form, as GGUF's gpt2 vocab stores it) and type: added
    special tokens are CONTROL (parsed as specials, never printed), other added tokens
    USER_DEFINED; ids past the tokenizer's (a padded embedding) are UNUSED placeholders."""
    import gguf

    n_tok = len(tokenizer)
    tokens = list(tokenizer.convert_ids_to_tokens(list(range(min(n_tok, n_vocab)))))
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < len(types):
            special = added.special
            types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, types


def _add_tokenizer(
    writer: Any, folder: Path, tokenizer: Any, n_vocab: int, pre: str | None
) -> None:
    import gguf

    tj_file = folder / "tokenizer.json"
    if not tj_file.is_file():
        raise ValueError(f"{folder} has no tokenizer.json; GGUF export needs a fast BPE tokenizer")
    tj = json.loads(tj_file.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(
            f"{folder}: GGUF export writes byte-level BPE tokenizers (gpt2 style); this one is "
            f"{model.get('type')} (byte_fallback={model.get('byte_fallback')})"
        )
    tokens, types = _token_types(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.chat_template = special.chat_template or tokenizer.chat_template
    if not special.chat_template:
        raise ValueError(f"{folder} has no chat template; GGUF export embeds the model's own")
    # What the HF tokenizer does to a plain text is what llama.cpp must do too.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"GGUF export writes plain rope; this checkpoint has rope scaling {kind!r}"
        )
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _add_hparams(writer: Any, config: Any) -> tuple[int, int]:
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim * n_head != int(config.hidden_size):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    return n_head, n_kv


def _add_tensors(writer: Any, model: Any, n_head: int, n_kv: int, outtype: str) -> int:
    """Every weight under its GGUF name; matrices in `outtype`, vectors (norms) in f32 as llama.cpp
    keeps them. A tied output head is left out (llama.cpp reuses token_embd)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} of a llama checkpoint")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = rope_interleave(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = rope_interleave(data, n_kv)
        if outtype == "bf16" and data.ndim > 1:  # numpy has no bf16: gguf rounds to nearest even
            bf16 = gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            dtype = np.float16 if outtype == "f16" and data.ndim > 1 else np.float32
            writer.add_tensor(name, np.ascontiguousarray(data.astype(dtype)))
        count += 1
    return count


@contextlib.contextmanager
def llama_gguf_writer(out: Path) -> Iterator[Any]:
    """A `gguf` writer for a llama-architecture file at `out`: what the block adds is written
    when it ends, and the file appears under its name only once complete."""
    import gguf

    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)


def write_gguf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    outtype: str = "f16",
    metadata: Mapping[str, Any] | None = None,
    pre: str | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Write `checkpoint` (a Llama checkpoint folder, or an adapter folder, written merged into its
    base) to the GGUF file `out`; `metadata` (lineage tags) lands as `arenaflow.<key>` strings.
    The file appears under its name only once complete."""
    import gguf

    from arenaflow.models import load_model, load_tokenizer

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r} is not one of {', '.join(OUTTYPES)}")
    folder, out = Path(checkpoint), Path(out)
    model = load_model(folder, tracking_uri=tracking_uri)
    config = model.config
    if config.model_type != "llama":
        raise ValueError(
            f"GGUF export writes Llama-architecture checkpoints; {folder} is {config.model_type!r}"
        )
    tokenizer = load_tokenizer(folder)
    with llama_gguf_writer(out) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str((metadata or {}).get("arenaflow.base_model") or folder.name))
        n_head, n_kv = _add_hparams(writer, config)
        writer.add_file_type(_file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, folder, tokenizer, int(config.vocab_size), pre)
        for key, value in (metadata or {}).items():
            writer.add_string(
                key if key.startswith("arenaflow.") else f"arenaflow.{key}", str(value)
            )
        n = _add_tensors(writer, model, n_head, n_kv, outtype)
    log.info("wrote %s (%s, %d tensors, %.1f MB)", out, outtype, n, out.stat().st_size / 1e6)
    return out
