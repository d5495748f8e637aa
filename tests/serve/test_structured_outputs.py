"""`response_format` through a real server and the official client: the tiny random model's output
parses and validates, streamed or not, n > 1, beside unconstrained requests in one batch."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

ASK = [{"role": "user", "content": "Describe a person."}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]


def json_schema_format(model: type[BaseModel]) -> dict:
    schema = {**model.model_json_schema(), "additionalProperties": False}
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": schema, "strict": True},
    }


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def test_parse_returns_a_valid_object(client: OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="tiny-chat", messages=ASK, response_format=Person, max_tokens=60, temperature=0
    )
    choice = completion.choices[0]
    assert isinstance(choice.message.parsed, Person)
    assert choice.finish_reason == "stop"


def test_stream_and_n_choices_are_valid(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=ASK,
        response_format=json_schema_format(Person),
        max_tokens=60,
        temperature=1.0,
        seed=3,
        n=2,
        stream=True,
    )
    texts, finishes = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    people = [Person.model_validate_json(t) for t in texts]
    assert finishes == ["stop", "stop"]
    assert people[0] != people[1]  # each choice decodes under its own matcher


def test_unconstrained_requests_in_the_same_batch_are_unchanged(client: OpenAI) -> None:
    questions = ["Hi", "List three prime numbers.", "Explain gravity to a child."]

    def free(q: str) -> str:
        messages = [{"role": "user", "content": q}]
        out = client.chat.completions.create(
            model="tiny-chat", messages=messages, max_tokens=12, temperature=0
        )
        return out.choices[0].message.content

    def constrained(_: int) -> str:
        out = client.chat.completions.create(
            model="tiny-chat",
            messages=ASK,
            response_format={"type": "json_object"},
            max_tokens=40,
            temperature=0,
        )
        return out.choices[0].message.content

    solo = [free(q) for q in questions]
    with ThreadPoolExecutor(6) as pool:
        json_answers = [pool.submit(constrained, i) for i in range(3)]
        mixed = list(pool.map(free, questions))
    assert mixed == solo
    assert all(isinstance(json.loads(f.result()), dict) for f in json_answers)


def test_text_completions_take_response_format(server) -> None:
    body = {
        "model": "tiny-chat",
        "prompt": "A person:",
        "max_tokens": 60,
        "response_format": json_schema_format(Person),
    }
    r = httpx.post(f"{server.v1}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    Person.model_validate_json(r.json()["choices"][0]["text"])


@pytest.mark.parametrize(
    "response_format, param",
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
            "response_format.json_schema.schema",
        ),
        (  # valid JSON Schema, but a reference the grammar compiler cannot resolve
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
            "response_format",
        ),
    ],
)
def test_bad_response_format_is_a_400_naming_it(server, response_format: dict, param: str) -> None:
    body = {"model": "tiny-chat", "messages": ASK, "response_format": response_format}
    r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
