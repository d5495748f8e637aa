"""Constrained decoding on the real tiny Llama: a random model's output still parses and validates."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from arenaflow.engine import Engine, SamplingParams
from arenaflow.engine.constraints import Constraint, InvalidConstraintError


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]


PERSON = Constraint.json_schema(Person.model_json_schema())


def _texts(result) -> list[str]:
    return [c.text for c in result.choices]


def test_schema_output_validates_for_every_choice(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=5, n=3, constraint=PERSON)
    result = tiny_engine.generate(chat_prompts[:1], params)[0]
    people = [Person.model_validate_json(t) for t in _texts(result)]
    assert all(c.finish_reason == "stop" for c in result.choices)
    assert len({p.model_dump_json() for p in people}) > 1  # each choice walks its own matcher
    assert list(json.loads(result.choices[0].text)) == ["name", "age", "mood"]  # schema order


def test_mixed_batch_leaves_unconstrained_rows_alone(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    """Rows without a constraint, with a schema and with a regex share one batch (max_batch_size=2
    forces rows to join mid-generation); the free rows decode exactly as they do alone."""
    free = SamplingParams(max_new_tokens=10)
    solo = [tiny_engine.generate([p], free)[0].choices[0].token_ids for p in chat_prompts[:3]]
    yes_no = Constraint.regex(r"(yes|no)")
    params = [
        free,
        SamplingParams(max_new_tokens=60, constraint=PERSON),
        free,
        SamplingParams(max_new_tokens=10, constraint=yes_no),
        free,
    ]
    prompts = [chat_prompts[0], chat_prompts[1], chat_prompts[1], chat_prompts[3], chat_prompts[2]]
    tiny_engine.max_batch_size = 2
    try:
        mixed = tiny_engine.generate(prompts, params)
    finally:
        tiny_engine.max_batch_size = 16
    assert [mixed[i].choices[0].token_ids for i in (0, 2, 4)] == [solo[0], solo[1], solo[2]]
    Person.model_validate_json(mixed[1].choices[0].text)
    assert mixed[3].choices[0].text in ("yes", "no")
    assert mixed[3].choices[0].finish_reason == "stop"


def test_eos_is_allowed_only_where_the_grammar_accepts(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    """With the output layer biased towards eos, a free row stops at once; a constrained row
    cannot end before its JSON is complete, then ends on eos."""
    import torch

    eos = tiny_engine.tokenizer.eos_token_id
    head = tiny_engine.model.get_output_embeddings()
    saved = head.weight.data[eos].clone()
    head.weight.data[eos] = head.weight.data.abs().max() * 50
    params = [
        SamplingParams(max_new_tokens=60),
        SamplingParams(max_new_tokens=60, constraint=PERSON),
    ]
    try:
        with torch.inference_mode():
            free, constrained = tiny_engine.generate(chat_prompts[:2], params)
    finally:
        head.weight.data[eos] = saved
    assert free.choices[0].token_ids == [] and free.choices[0].finish_reason == "stop"
    Person.model_validate_json(constrained.choices[0].text)
    assert constrained.choices[0].finish_reason == "stop"


def test_stream_lark_stop_strings_and_length(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    verdict = Constraint.lark('start: "[[" ("A" | "B" | "tie") "]]"')
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=2, constraint=verdict)
    events = list(tiny_engine.stream(chat_prompts[0], params))
    streamed = "".join(e.text for e in events)
    assert streamed in ("[[A]]", "[[B]]", "[[tie]]")
    assert events[-1].finish_reason == "stop"
    assert streamed == tiny_engine.generate(chat_prompts[:1], params)[0].choices[0].text
    stopped = SamplingParams(max_new_tokens=12, stop=["]"], constraint=verdict)
    assert tiny_engine.generate(chat_prompts[:1], stopped)[0].choices[0].text.startswith("[[")
    assert "]" not in tiny_engine.generate(chat_prompts[:1], stopped)[0].choices[0].text
    cut = SamplingParams(max_new_tokens=3, constraint=PERSON)
    choice = tiny_engine.generate(chat_prompts[:1], cut)[0].choices[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 3


def test_json_object_and_the_compile_cache(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    params = SamplingParams(max_new_tokens=40, constraint=Constraint.json_object())
    text = tiny_engine.generate(chat_prompts[:1], params)[0].choices[0].text
    assert isinstance(json.loads(text), dict)
    compiler = tiny_engine.constraints
    assert compiler.compile(PERSON) is compiler.compile(
        Constraint.json_schema(Person.model_json_schema())
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Constraint.json_schema({"type": "nonsense"}), "nonsense"),
        (lambda: Constraint.json_schema(["not", "an", "object"]), "must be an object"),
        (lambda: Constraint.lark("start: undefined_rule"), "undefined_rule"),
        (lambda: Constraint.regex("(unclosed"), "regex"),
        (lambda: Constraint("xml", "<a/>"), "xml"),
    ],
)
def test_invalid_constraints_are_refused_before_queueing(
    tiny_engine: Engine, chat_prompts: list[str], make, match: str
) -> None:
    with pytest.raises(InvalidConstraintError, match=match):
        tiny_engine.make_request(chat_prompts[0], SamplingParams(constraint=make()))
