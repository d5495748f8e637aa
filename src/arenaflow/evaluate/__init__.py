"""Evaluate stage (entry point: `stage.py`): MT-bench questions, every competitor's answers, and the
decontamination report."""

from arenaflow.evaluate.answers import answer_competitor
from arenaflow.evaluate.decontamination import decontaminate
from arenaflow.evaluate.questions import write_questions
from arenaflow.evaluate.stage import run

__all__ = ["answer_competitor", "decontaminate", "run", "write_questions"]
