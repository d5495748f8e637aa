"""Turn FastChat conversations into supervised fine-tuning examples with the model's own chat template.

Training must see exactly the tokens generation will produce, so conversations are rendered with
`tokenizer.apply_chat_template` (the same call the engine makes) and the trainable span of every
assistant turn is found by rendering prefixes and checking they are token prefixes of the whole.
Labels are -100 everywhere except the assistant reply and its end-of-turn token.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

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


def _render_text(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja raise_exception() in strict templates, TemplateError
        raise TemplateMismatchError(f"chat template refused the conversation: {e}") from e


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    return encode_text(tokenizer, _render_text(tokenizer, messages, generation_prompt))


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that close an assistant turn for this tokenizer (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_arenaflow_eot_ids", None)
    if cached is not None:
        return cached
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    unk = tokenizer.unk_token_id
    for tok in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != unk and tokenizer.convert_ids_to_tokens(tid) == tok:
            ids.add(tid)
    tokenizer._arenaflow_eot_ids = ids
    return ids


def encode_conversation(
    tokenizer: Any, conversation: Sequence[dict[str, str]], max_length: int | None = None
) -> dict[str, list[int]]:
    """Tokenize a conversation and label only assistant replies (+ their end-of-turn token).

    For every assistant turn i, the renderings of messages[:i] (with the generation prompt, as
    the engine renders it) and of messages[:i+1] must be prefixes of the whole rendering, and the
    whole token sequence must equal the concatenated tokens of the pieces between those prefixes,
    i.e. every prefix's tokens are a prefix of the whole's. Otherwise (templates that rewrite
    earlier turns, BPE merges across a boundary) the labels could point at the wrong tokens, so
    `TemplateMismatchError` is raised. Tokenizing pieces keeps this linear in the length.
    """
    messages = to_messages(conversation)
    if not any(m["role"] == "assistant" for m in messages):
        raise TemplateMismatchError("conversation has no assistant turn to train on")
    text = _render_text(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = _render_text(tokenizer, messages[:i], generation_prompt=True)
        stop = _render_text(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (text.startswith(start) and text.startswith(stop) and len(stop) > len(start)):
            raise TemplateMismatchError(
                f"assistant turn {i}: the rendering of the conversation up to this turn is not a "
                "prefix of the whole rendering"
            )
        spans.append((len(start), len(stop)))
    cuts = sorted({0, len(text), *(c for span in spans for c in span)})
    ids: list[int] = []
    token_at: dict[int, int] = {}
    for a, b in zip(cuts, cuts[1:], strict=False):
        token_at[a] = len(ids)
        piece = text[a:b]
        if a == 0:
            ids += encode_text(tokenizer, piece)
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    token_at[len(text)] = len(ids)
    if ids != encode_text(tokenizer, text):
        raise TemplateMismatchError(
            "tokens merge across a turn boundary: the turns' token prefixes are not prefixes of "
            "the whole conversation's tokens"
        )
    labels = [IGNORE_INDEX] * len(ids)
    eot = end_of_turn_ids(tokenizer)
    for a, b in spans:
        start, stop = token_at[a], token_at[b]
        last_eot = max((j for j in range(start, stop) if ids[j] in eot), default=None)
        end = last_eot + 1 if last_eot is not None else stop
        labels[start:end] = ids[start:end]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def content_tokens(tokenizer: Any, turns: Sequence[dict[str, str]]) -> list[int]:
    """Token counts of each turn's text alone: a cheap lower bound on what the turn costs rendered."""
    if not turns:
        return []
    enc = tokenizer([t["value"] for t in turns], add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in enc]


def split_conversation(
    tokenizer: Any, conversation: Sequence[dict[str, str]], max_length: int
) -> tuple[list[list[dict[str, str]]], int]:
    """Split a long conversation into pieces of whole human+gpt pairs that fit `max_length` tokens.

    A new piece starts when the next pair would overflow the current one; a leading system turn is
    repeated at the head of every piece. A single pair longer than the limit cannot be trained on
    without cutting the reply, so it is dropped and counted. Returns (pieces, n_dropped_pairs).
    Exact lengths come from rendering with the template; the turns' own token counts (a lower
    bound) rule out pieces that cannot fit without rendering them.
    """
    turns = list(conversation)
    head = turns[:1] if turns and turns[0].get("from") == "system" else []
    body = turns[len(head) :]
    pairs = [body[i : i + 2] for i in range(0, len(body) - 1, 2)]
    costs = content_tokens(tokenizer, body)
    pair_cost = [costs[2 * i] + costs[2 * i + 1] for i in range(len(pairs))]
    head_cost = content_tokens(tokenizer, head)[0] if head else 0

    def length(piece: list[dict[str, str]]) -> int:
        return len(_render(tokenizer, to_messages(piece), generation_prompt=False))

    pieces: list[list[dict[str, str]]] = []
    current: list[dict[str, str]] = []
    current_len = 0
    dropped = 0
    for pair, cost in zip(pairs, pair_cost, strict=True):
        if current and current_len + cost <= max_length:
            candidate_len = length([*head, *current, *pair])
            if candidate_len <= max_length:
                current, current_len = [*current, *pair], candidate_len
                continue
        if current:
            pieces.append([*head, *current])
            current, current_len = [], 0
        alone = length([*head, *pair]) if head_cost + cost <= max_length else max_length + 1
        if alone <= max_length:
            current, current_len = list(pair), alone
        else:
            dropped += 1
    if current:
        pieces.append([*head, *current])
    return pieces, dropped


# -- the dataset ----------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids: vocabulary, special tokens and chat template."""
    import hashlib
    import json

    payload = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": sorted(map(str, tokenizer.all_special_tokens)),
            "template": tokenizer.chat_template or "",
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def encode_record(
    tokenizer: Any, record: dict[str, Any], max_length: int
) -> tuple[list[dict[str, Any]], Counter]:
    """One cleaned conversation -> training examples (split into fitting pieces) + what was dropped."""
    counts: Counter = Counter()
    conv = record["conversations"]
    try:
        enc = None
        # Either order is exact; guess from the length in chars which one tokenizes less.
        likely_long = sum(len(t["value"]) for t in conv) > 4 * max_length
        if not likely_long or sum(content_tokens(tokenizer, conv)) <= max_length:
            enc = encode_conversation(tokenizer, conv)
        if enc is not None and len(enc["input_ids"]) <= max_length:
            pieces_enc = [enc]
        else:
            pieces, dropped = split_conversation(tokenizer, conv, max_length)
            counts["dropped_pairs"] += dropped
            counts["split_conversations"] += len(pieces) > 1
            pieces_enc = [encode_conversation(tokenizer, p, max_length) for p in pieces]
    except TemplateMismatchError as e:
        log.debug("record %s: %s", record["id"], e)
        counts["template_mismatch"] += 1
        return [], counts
    if not pieces_enc:
        counts["too_long"] += 1
        return [], counts
    examples = []
    for k, e in enumerate(pieces_enc):
        rid = record["id"] if len(pieces_enc) == 1 else f"{record['id']}_{k}"
        examples.append({"id": rid, "length": len(e["input_ids"]), **e})
    return examples, counts


_worker_tokenizer: Any = None


def _init_worker(tokenizer_dir: str, model_cfg: Any) -> None:
    global _worker_tokenizer
    from arenaflow.models import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_dir, model_cfg)


def _encode_chunk(args: tuple[list[str], int]) -> list[tuple[list[dict[str, Any]], Counter]]:
    import json

    lines, max_length = args
    return [encode_record(_worker_tokenizer, json.loads(line), max_length) for line in lines]


def _encode_all(
    lines: list[str],
    tokenizer_dir: str,
    model_cfg: Any,
    max_length: int,
    num_workers: int,
    chunk_size: int,
) -> list[tuple[list[dict[str, Any]], Counter]]:
    """Every line's examples and drop counts, in file order (spawned workers when num_workers > 1)."""
    from tqdm import tqdm

    chunks = [(lines[i : i + chunk_size], max_length) for i in range(0, len(lines), chunk_size)]
    results: list[tuple[list[dict[str, Any]], Counter]] = []
    bar = tqdm(total=len(lines), desc="sft_dataset", unit="conv", mininterval=2.0)
    if num_workers <= 1 or len(chunks) <= 1:
        _init_worker(tokenizer_dir, model_cfg)
        for chunk in chunks:
            results.extend(_encode_chunk(chunk))
            bar.update(len(chunk[0]))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(num_workers, _init_worker, (tokenizer_dir, model_cfg)) as pool:
            for part in pool.imap(_encode_chunk, chunks):
                results.extend(part)
                bar.update(len(part))
    bar.close()
    return results


def split_by_conversation(
    groups: list[list[dict[str, Any]]], val_ratio: float, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """Train/validation rows with a seeded shuffle of conversations (their pieces stay together)."""
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = int(round(len(groups) * val_ratio)) if val_ratio > 0 else 0
    if val_ratio > 0 and len(groups) >= 2:
        n_val = min(max(n_val, 1), len(groups) - 1)
    val_idx = set(order[:n_val].tolist())
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for i, examples in enumerate(groups):
        splits["validation" if i in val_idx else "train"].extend(examples)
    return splits


def _save_splits(splits: dict[str, list[dict[str, Any]]], out_uri: str) -> None:
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )
    dd = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {k: [r[k] for r in rows] for k in features}, features=features
            )
            for name, rows in splits.items()
            if rows or name == "train"  # datasets cannot reload an empty split (val_ratio=0)
        }
    )
    dd.save_to_disk(out_uri)


def build_sft_dataset(
    clean_uri: str,
    out_uri: str,
    *,
    tokenizer_dir: str,
    model_cfg: Any,
    max_length: int,
    val_ratio: float,
    seed: int,
    num_workers: int,
    chunk_size: int = 64,
    limit: int | None = None,
) -> dict[str, Any]:
    """Tokenize cleaned conversations with the model's template into a train/validation DatasetDict.

    The split is by conversation (pieces of one conversation stay together) with a seeded shuffle.
    Returns the counts; `input == kept + sum(dropped)` at the conversation level.
    """
    import fsspec

    from arenaflow.models import load_tokenizer

    with fsspec.open(clean_uri, "r", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    n_input = len(lines)
    if limit is not None and 0 <= limit < n_input:
        # A seeded sample (in file order) for small training budgets; the rest is counted, not lost.
        keep = np.sort(np.random.default_rng(seed).choice(n_input, size=limit, replace=False))
        lines = [lines[i] for i in keep]
    results = _encode_all(lines, tokenizer_dir, model_cfg, max_length, num_workers, chunk_size)
    counts: Counter = Counter()
    groups = []
    for examples, c in results:
        counts.update(c)
        if examples:
            groups.append(examples)
    splits = split_by_conversation(groups, val_ratio, seed)
    _save_splits(splits, out_uri)

    all_rows = splits["train"] + splits["validation"]
    lengths = [r["length"] for r in all_rows]
    trainable = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in all_rows)
    total = sum(lengths)
    tok = load_tokenizer(tokenizer_dir, model_cfg)
    dropped = {k: counts[k] for k in ("template_mismatch", "too_long") if counts[k]}
    if n_input > len(lines):
        dropped["over_sft_limit"] = n_input - len(lines)
    return {
        "input": n_input,
        "kept": len(groups),
        "dropped": dropped,
        "examples": len(all_rows),
        "train": len(splits["train"]),
        "validation": len(splits["validation"]),
        "split_conversations": counts["split_conversations"],
        "dropped_pairs": counts["dropped_pairs"],
        "tokens": total,
        "trainable_tokens": trainable,
        "trainable_fraction": trainable / total if total else 0.0,
        "max_length": max_length,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "lengths": lengths,
    }
