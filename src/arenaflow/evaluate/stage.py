"""Evaluate stage: MT-bench questions, every competitor's answers, and the decontamination report.

`run(cfg)` is the CLI door (`python -m arenaflow.evaluate`); the Dagster assets call its parts
(`write_questions`, `answer_competitor`, `decontaminate`) one asset at a time.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.evaluate.answers import answer_competitor
from arenaflow.evaluate.competitors import parse_competitors
from arenaflow.evaluate.decontamination import decontaminate
from arenaflow.evaluate.questions import write_questions

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Questions, then answers of every configured competitor, then decontamination (if SFT data exists)."""
    questions = write_questions(cfg)
    answers = {
        c.name: answer_competitor(cfg, c.name, questions_file=questions["uri"])
        for c in parse_competitors(cfg.evaluate.competitors)
    }
    sft_uri = io.artifact_uri(cfg, "data", "sharegpt_clean.jsonl")
    if io.exists(sft_uri):
        report = decontaminate(cfg, sft_uri)
        decon = {k: report[k] for k in ("uri", "contaminated_share", "above_threshold")}
    else:
        log.warning("decontamination skipped: no SFT conversations at %s", sft_uri)
        decon = {"skipped": f"no SFT conversations at {sft_uri}"}
    return {
        "questions": {k: questions[k] for k in ("uri", "count")},
        "answers": {
            name: {k: a[k] for k in ("uri", "answered", "failed", "tokens_per_s")}
            for name, a in answers.items()
        },
        "decontamination": decon,
    }
