"""Turn FastChat conversations into supervised fine-tuning examples with the model's own chat template.

Training must see exactly the tokens generation will produce, so conversations are rendered with
`tokenizer.apply_chat_template` (the same call the engine makes) and the trainable span of every
assistant turn is found by rendering prefixes and checking they are token prefixes of the whole.
Labels are -100 everywhere except the assistant reply and its end-of-turn token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system"}
# End-of-turn markers of common chat templates; the tokenizer's eos is always one of them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


class TemplateMismatchError(ValueError):
    """The chat template's rendering of a conversation cannot be split into per-turn token spans."""


def to_messages(conversation: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """FastChat turns ({"from", "value"}) -> chat-template messages ({"role", "content"})."""
    messages = []
    for turn in conversation:
        role = ROLE_MAP.get(turn.get("from", ""))
        if role is None:
            raise ValueError(
                f"turn role {turn.get('from')!r} is not one of {sorted(ROLE_MAP)}; "
                "clean the data with the sharegpt_clean step first"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text; text that already starts with BOS gets no second one (as the engine)."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja raise_exception() in strict templates, TemplateError
        raise TemplateMismatchError(f"chat template refused the conversation: {e}") from e
    return encode_text(tokenizer, text)


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that close an assistant turn for this tokenizer."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return ids


def encode_conversation(
    tokenizer: Any, conversation: Sequence[dict[str, str]], max_length: int | None = None
) -> dict[str, list[int]]:
    """Tokenize a conversation and label only assistant replies (+ their end-of-turn token).

    Raises `TemplateMismatchError` when prefix renderings are not token prefixes of the whole
    rendering (templates that rewrite earlier turns, BPE merges across a boundary), because the
    labels could then point at the wrong tokens.
    """
    messages = to_messages(conversation)
    if not any(m["role"] == "assistant" for m in messages):
        raise TemplateMismatchError("conversation has no assistant turn to train on")
    full = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    eot = end_of_turn_ids(tokenizer)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start_ids = _render(tokenizer, messages[:i], generation_prompt=True)
        stop_ids = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        start, stop = len(start_ids), len(stop_ids)
        if full[:start] != start_ids or full[:stop] != stop_ids or stop <= start:
            raise TemplateMismatchError(
                f"assistant turn {i}: the rendering of the conversation up to this turn is not a "
                "token prefix of the whole rendering"
            )
        last_eot = max((j for j in range(start, stop) if full[j] in eot), default=None)
        end = last_eot + 1 if last_eot is not None else stop
        labels[start:end] = full[start:end]
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "labels": labels}


def split_conversation(
    tokenizer: Any, conversation: Sequence[dict[str, str]], max_length: int
) -> tuple[list[list[dict[str, str]]], int]:
    """Split a long conversation into pieces of whole human+gpt pairs that fit `max_length` tokens.

    A new piece starts when the next pair would overflow the current one; a leading system turn is
    repeated at the head of every piece. A single pair longer than the limit cannot be trained on
    without cutting the reply, so it is dropped and counted. Returns (pieces, n_dropped_pairs).
    """
    turns = list(conversation)
    head = turns[:1] if turns and turns[0].get("from") == "system" else []
    body = turns[len(head) :]
    pairs = [body[i : i + 2] for i in range(0, len(body) - 1, 2)]

    def length(piece: list[dict[str, str]]) -> int:
        return len(_render(tokenizer, to_messages(piece), generation_prompt=False))

    pieces: list[list[dict[str, str]]] = []
    current: list[dict[str, str]] = []
    dropped = 0
    for pair in pairs:
        candidate = [*head, *current, *pair]
        if length(candidate) <= max_length:
            current = [*current, *pair]
            continue
        if current:
            pieces.append([*head, *current])
            current = []
        if length([*head, *pair]) <= max_length:
            current = list(pair)
        else:
            dropped += 1
    if current:
        pieces.append([*head, *current])
    return pieces, dropped
