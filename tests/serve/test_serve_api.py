"""The OpenAI-compatible endpoint through the official `openai` client against real uvicorn and the tiny model."""

from __future__ import annotations

import pytest
from openai import OpenAI

from arenaflow.engine import Engine, SamplingParams

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def greedy(engine: Engine, content: str, max_tokens: int) -> tuple[str, int, int]:
    prompt = engine.render_chat([{"role": "user", "content": content}])
    result = engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens))[0]
    return result.choices[0].text, result.prompt_tokens, result.completion_tokens


def test_models_list_shows_the_card(client: OpenAI, tiny_model_dir) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    card = models[0].model_dump()
    assert card["lineage"] == {"checkpoint": str(tiny_model_dir)}
    assert card["context_length"] == 2048 and len(card["chat_template_hash"]) >= 8
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"


def test_chat_matches_engine_greedy_with_usage(client: OpenAI, serve_engine: Engine) -> None:
    text, prompt_tokens, completion_tokens = greedy(serve_engine, QUESTION, 12)
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=12,
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == completion_tokens
    assert out.usage.total_tokens == prompt_tokens + completion_tokens


def test_system_message_and_max_completion_tokens(client: OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Count to three."},
        ],
        temperature=0,
        max_completion_tokens=5,
    )
    assert out.usage.completion_tokens <= 5
    assert out.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream_and_reports_usage(client: OpenAI, serve_engine: Engine) -> None:
    text, prompt_tokens, completion_tokens = greedy(serve_engine, QUESTION, 12)
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == completion_tokens


def test_completions_with_prompt_list_and_n(client: OpenAI, serve_engine: Engine) -> None:
    prompts = ["The sky is", "One, two, three,"]
    out = client.completions.create(
        model="tiny-chat", prompt=prompts, max_tokens=6, n=2, temperature=0
    )
    assert out.object == "text_completion"
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    expected = [
        r.choices[0].text for r in serve_engine.generate(prompts, SamplingParams(max_new_tokens=6))
    ]
    assert [c.text for c in out.choices] == [expected[0]] * 2 + [expected[1]] * 2
    prompt_tokens = sum(len(serve_engine.encode(p)) for p in prompts)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens <= 4 * 6


def test_completions_stream(client: OpenAI) -> None:
    full = client.completions.create(
        model="tiny-chat", prompt="The sky is", max_tokens=8, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="tiny-chat", prompt="The sky is", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_stop_sequence_cuts_the_answer(client: OpenAI) -> None:
    base = client.completions.create(
        model="tiny-chat", prompt="The sky is", max_tokens=24, temperature=0
    )
    text = base.choices[0].text
    assert len(text) > 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(
        model="tiny-chat", prompt="The sky is", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_n_choices_and_seed_reproducibility(client: OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=1.0,
            max_tokens=10,
            n=3,
            seed=seed,
        )
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.message.content for c in out.choices]

    first = sample(7)
    assert sample(7) == first
    assert len(set(first)) > 1, "n choices of a sampled request should differ"
    assert sample(8) != first


def test_logprobs_and_top_logprobs(client: OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0
        assert len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].token == tok.token  # greedy picks the most likely token
        assert tok.top_logprobs[0].logprob == pytest.approx(tok.logprob, abs=1e-4)
    legacy = client.completions.create(
        model="tiny-chat", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == legacy.choices[0].text


def test_penalties_and_logit_bias_reach_the_engine(client: OpenAI, serve_engine: Engine) -> None:
    """The official client's own fields (`extra_body` for vLLM's repetition_penalty) give what the
    engine gives for the same settings, streamed or not; a +100 bias forces its token."""
    ocean = serve_engine.tokenizer.encode(" ocean", add_special_tokens=False)[0]
    settings = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3}
    prompt = serve_engine.render_chat([{"role": "user", "content": QUESTION}])
    plain = serve_engine.generate([prompt], SamplingParams(max_new_tokens=16))[0].choices[0].text
    expected = serve_engine.generate([prompt], SamplingParams(max_new_tokens=16, **settings))
    assert expected[0].choices[0].text != plain  # the settings change this answer
    request = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 16,
        "presence_penalty": settings["presence_penalty"],
        "frequency_penalty": settings["frequency_penalty"],
        "extra_body": {"repetition_penalty": settings["repetition_penalty"]},
    }
    out = client.chat.completions.create(**request)
    assert out.choices[0].message.content == expected[0].choices[0].text
    chunks = client.chat.completions.create(**request, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected[0].choices[0].text
    forced = client.completions.create(
        model="tiny-chat", prompt="The sky is", max_tokens=4, temperature=0.8, seed=3,
        logit_bias={str(ocean): 100},
    )  # fmt: skip
    assert forced.choices[0].text == serve_engine.tokenizer.decode([ocean] * 4)
