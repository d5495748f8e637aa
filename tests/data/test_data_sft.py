"""SFT encoding: the model's own chat template, labels only on assistant replies + end-of-turn."""

from __future__ import annotations

import pytest

from arenaflow.data.sft import (
    IGNORE_INDEX,
    TemplateMismatchError,
    encode_conversation,
    split_conversation,
    to_messages,
)
from arenaflow.models import load_tokenizer

CONV = [
    {"from": "human", "value": "Hi there"},
    {"from": "gpt", "value": "Hello! How can I help?"},
    {"from": "human", "value": "Tell me a joke"},
    {"from": "gpt", "value": "Why did the chicken cross the road?"},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def trainable_spans(enc: dict) -> list[list[int]]:
    spans, cur = [], []
    for label in enc["labels"]:
        if label == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(label)
    if cur:
        spans.append(cur)
    return spans


def test_to_messages_maps_roles():
    msgs = to_messages([{"from": "system", "value": "s"}, *CONV[:2]])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[2]["content"] == "Hello! How can I help?"
    with pytest.raises(ValueError, match="bing"):
        to_messages([{"from": "bing", "value": "x"}])


def test_encode_matches_generation_rendering(tok):
    enc = encode_conversation(tok, CONV)
    text = tok.apply_chat_template(to_messages(CONV), tokenize=False)
    assert tok.decode(enc["input_ids"]) == text
    assert len(enc["labels"]) == len(enc["input_ids"])
    # the prompt the engine renders for turn 1 is an exact token prefix
    prompt = tok.apply_chat_template(
        to_messages(CONV[:1]), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][: len(prompt_ids)] == prompt_ids
    assert enc["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)


def test_only_assistant_replies_and_end_of_turn_are_trainable(tok):
    enc = encode_conversation(tok, CONV)
    spans = trainable_spans(enc)
    assert [tok.decode(s) for s in spans] == [
        "Hello! How can I help?<|im_end|>",
        "Why did the chicken cross the road?<|im_end|>",
    ]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert all(s[-1] == im_end for s in spans)
    # the "\n" glue after <|im_end|> and the "<|im_start|>assistant\n" header are masked
    for i, (tid, label) in enumerate(zip(enc["input_ids"], enc["labels"], strict=True)):
        if label != IGNORE_INDEX:
            assert label == tid
        if i > 0 and enc["labels"][i - 1] == im_end:
            assert label == IGNORE_INDEX
    n_trainable = sum(label != IGNORE_INDEX for label in enc["labels"])
    assert n_trainable == sum(len(s) for s in spans) < len(enc["input_ids"]) // 2


def test_system_turn_replaces_default_system_prompt(tok):
    conv = [{"from": "system", "value": "Be terse."}, *CONV[:2]]
    enc = encode_conversation(tok, conv)
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert [tok.decode(s) for s in trainable_spans(enc)] == ["Hello! How can I help?<|im_end|>"]


def test_max_length_truncates_both(tok):
    enc = encode_conversation(tok, CONV, max_length=20)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 20


def test_template_that_rewrites_history_is_a_mismatch(tok, tiny_model_dir):
    # a template that renders the *last* assistant turn differently from earlier ones (as
    # reasoning templates do) cannot be aligned turn by turn
    odd = load_tokenizer(tiny_model_dir)
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' }}"
        "{% if loop.last %}{{ m['content'] }}{% else %}[..]{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(TemplateMismatchError):
        encode_conversation(odd, CONV)
    with pytest.raises(TemplateMismatchError, match="no assistant"):
        encode_conversation(tok, CONV[:1])


def test_split_conversation_whole_pairs(tok):
    long_reply = "word " * 70
    conv = [
        {"from": "system", "value": "Sys."},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": long_reply * 3},  # alone longer than the limit: dropped
        {"from": "human", "value": "q3"},
        {"from": "gpt", "value": long_reply},
        {"from": "human", "value": "q4"},
        {"from": "gpt", "value": "a4"},
    ]
    limit = 100
    pieces, dropped = split_conversation(tok, conv, limit)
    assert dropped == 1
    assert [[t["value"] for t in p if t["from"] == "human"] for p in pieces] == [
        ["q1"],
        ["q3"],
        ["q4"],
    ]
    for p in pieces:
        assert p[0] == {"from": "system", "value": "Sys."}
        assert len(encode_conversation(tok, p)["input_ids"]) <= limit
    whole, none_dropped = split_conversation(tok, CONV, 10_000)
    assert whole == [CONV] and none_dropped == 0


def test_sft_limit_samples_and_counts_the_rest(tiny_model_dir, tmp_path):
    from datasets import load_from_disk
    from omegaconf import OmegaConf

    from arenaflow import io
    from arenaflow.data.sft import build_sft_dataset

    clean = tmp_path / "clean.jsonl"
    io.write_jsonl(str(clean), [{"id": f"c{i}", "conversations": CONV} for i in range(10)])
    model_cfg = OmegaConf.create(
        {"name": "tiny", "chat_template": None, "trust_remote_code": False}
    )
    stats = build_sft_dataset(
        str(clean),
        str(tmp_path / "sft"),
        tokenizer_dir=str(tiny_model_dir),
        model_cfg=model_cfg,
        max_length=128,
        val_ratio=0.0,
        seed=0,
        num_workers=1,
        limit=4,
    )
    assert (stats["input"], stats["kept"], stats["dropped"]) == (10, 4, {"over_sft_limit": 6})
    assert len(load_from_disk(str(tmp_path / "sft"))["train"]) == 4
