"""Decontamination: word n-gram overlap between the SFT conversations and MT-bench questions/references.

A model fine-tuned on MT-bench text scores higher for the wrong reason; this report lists which
questions overlap the training data and through which conversations, so a person can judge it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from typing import Any

import fsspec
from omegaconf import DictConfig
from tqdm.auto import tqdm

from arenaflow import io
from arenaflow.evaluate.questions import (
    bench_uri,
    load_questions,
    load_references,
    reference_source,
)

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def build_index(
    questions: list[dict[str, Any]], references: dict[int, list[str]], n: int
) -> dict[tuple[str, ...], set[tuple[int, str]]]:
    """n-gram -> {(question_id, "question" | "reference")} over every turn of the selected questions."""
    index: dict[tuple[str, ...], set[tuple[int, str]]] = defaultdict(set)
    for q in questions:
        qid = q["question_id"]
        for text in q["turns"]:
            for g in ngrams(text, n):
                index[g].add((qid, "question"))
        for text in references.get(qid, []) + list(q.get("reference") or []):
            for g in ngrams(str(text), n):
                index[g].add((qid, "reference"))
    return index


def scan(
    sft_uri: str, index: dict[tuple[str, ...], set[tuple[int, str]]], n: int
) -> tuple[list[dict[str, Any]], int, Counter]:
    """Conversations of a FastChat JSONL that share an n-gram with the index; bad lines are counted."""
    hits, scanned, skipped = [], 0, Counter()
    with fsspec.open(sft_uri, "r", encoding="utf-8") as f:
        for line in tqdm(f, desc="decontamination", leave=False):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                turns = record["conversations"]
                texts = [str(t["value"]) for t in turns]
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped["malformed_conversation"] += 1
                continue
            scanned += 1
            matched: dict[int, set[str]] = defaultdict(set)
            example = ""
            for text in texts:
                for g in ngrams(text, n) & index.keys():
                    for qid, kind in index[g]:
                        matched[qid].add(kind)
                    example = example or " ".join(g)
            if matched:
                hits.append(
                    {
                        "id": str(record.get("id", scanned)),
                        "question_ids": sorted(matched),
                        "sources": sorted({k for kinds in matched.values() for k in kinds}),
                        "example_ngram": example,
                    }
                )
    return hits, scanned, skipped


def decontaminate(cfg: DictConfig, sft_uri: str | None = None) -> dict[str, Any]:
    """Write mt_bench/<bench>/decontamination.json and return its summary."""
    d = cfg.evaluate.decontamination
    n = int(d.ngram)
    sft_uri = sft_uri or io.artifact_uri(cfg, "data", "sharegpt_clean.jsonl")
    if not io.exists(sft_uri):
        raise FileNotFoundError(
            f"no SFT conversations at {sft_uri}; materialize sharegpt_clean "
            "(python -m arenaflow.data) before the decontamination report"
        )
    from arenaflow.evaluate.questions import questions_uri, write_questions

    qfile = questions_uri(cfg)
    if not io.exists(qfile):
        qfile = write_questions(cfg)["uri"]
    questions, _ = load_questions(qfile)
    references = load_references(reference_source(cfg))
    index = build_index(questions, references, n)
    hits, scanned, skipped = scan(sft_uri, index, n)
    contaminated = sorted({qid for h in hits for qid in h["question_ids"]})
    share = len(contaminated) / len(questions) if questions else 0.0
    report = {
        "uri": bench_uri(cfg, "decontamination.json"),
        "sft_uri": sft_uri,
        "ngram": n,
        "questions_checked": len(questions),
        "references_checked": sum(1 for q in questions if q["question_id"] in references),
        "conversations_scanned": scanned,
        "skipped": dict(skipped),
        "overlapping_conversations": len(hits),
        "contaminated_question_ids": contaminated,
        "contaminated_share": round(share, 4),
        "threshold": float(d.threshold),
        "above_threshold": share > float(d.threshold),
        "conversations": hits[: int(d.max_listed)],
    }
    io.write_json(report["uri"], report)
    log.info(
        "decontamination: %d/%d questions overlap %d SFT conversations (%d-grams)",
        len(contaminated),
        len(questions),
        len(hits),
        n,
    )
    return report
