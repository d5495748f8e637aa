"""The engine on the real tiny Llama: batching is invisible, sampling settings are honoured."""

from __future__ import annotations

from pathlib import Path

import pytest

from arenaflow.engine import Engine, PromptTooLongError, SamplingParams
from arenaflow.models import load_tokenizer
from arenaflow.tracking import tracker_from_cfg


def _ids(results):
    return [[c.token_ids for c in r.choices] for r in results]


def test_batched_greedy_equals_unbatched(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    params = SamplingParams(max_new_tokens=12)
    single = [tiny_engine.generate([p], params)[0] for p in chat_prompts]
    batched = tiny_engine.generate(chat_prompts, params)
    assert _ids(batched) == _ids(single)
    assert all(r.completion_tokens == 12 for r in batched)
    assert [r.prompt_tokens for r in batched] == [len(tiny_engine.encode(p)) for p in chat_prompts]


def test_rows_joining_a_running_batch_decode_as_if_alone(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    """Seeded sampling at temperature 1 on a random model is sensitive to any logit change, so equal
    samples mean left padding, position ids and cache merging (max_batch_size=2 forces joins
    mid-generation, with different max_new_tokens so rows leave at different steps) change nothing."""
    params = [
        SamplingParams(max_new_tokens=6 + 3 * i, temperature=1.0, seed=100 + i)
        for i in range(len(chat_prompts))
    ]
    single = [tiny_engine.generate([p], sp)[0] for p, sp in zip(chat_prompts, params, strict=True)]
    tiny_engine.max_batch_size = 2
    try:
        joined = tiny_engine.generate(chat_prompts, params)
    finally:
        tiny_engine.max_batch_size = 16
    assert _ids(joined) == _ids(single)
    assert len({tuple(c) for r in joined for c in _ids([r])[0]}) == len(chat_prompts)


def test_seed_n_and_top_p(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7, n=3)
    a = tiny_engine.generate(chat_prompts[:1], params)[0]
    b = tiny_engine.generate(chat_prompts[:1], params)[0]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert _ids([a]) == _ids([b])
    assert len({tuple(c.token_ids) for c in a.choices}) > 1  # choices are independent samples
    assert a.completion_tokens == 24


def test_stop_strings_are_trimmed_and_max_tokens_respected(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    base = SamplingParams(max_new_tokens=20, temperature=1.0, seed=3)
    full = tiny_engine.generate(chat_prompts[:1], base)[0].choices[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 4]
    cut = full.text.index(stop)
    stopped = tiny_engine.generate(
        chat_prompts[:1],
        SamplingParams(max_new_tokens=20, temperature=1.0, seed=3, stop=["@@never@@", stop]),
    )[0].choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert len(stopped.token_ids) < 20
    short = tiny_engine.generate(chat_prompts[:2], SamplingParams(max_new_tokens=3))
    assert all(len(r.choices[0].token_ids) == 3 for r in short)
    assert all(r.choices[0].finish_reason == "length" for r in short)


def test_eos_stops_generation(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    """Force eos by biasing the model's output layer: generation must end with finish_reason stop."""
    import torch

    eos = tiny_engine.tokenizer.eos_token_id
    head = tiny_engine.model.get_output_embeddings()
    saved = head.weight.data[eos].clone()
    head.weight.data[eos] = head.weight.data.abs().max() * 50
    try:
        with torch.inference_mode():
            r = tiny_engine.generate(chat_prompts[:1], SamplingParams(max_new_tokens=10))[0]
    finally:
        head.weight.data[eos] = saved
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].token_ids == [] and r.choices[0].text == ""
    assert r.completion_tokens == 1


def test_logprobs_and_top_logprobs(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    r = tiny_engine.generate(
        chat_prompts[1:2], SamplingParams(max_new_tokens=4, logprobs=True, top_logprobs=5)
    )[0]
    lps = r.choices[0].logprobs
    assert lps is not None and len(lps) == 4
    for lp in lps:
        assert len(lp.top) == 5
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.token_id == lp.top[0].token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0].logprob) and lp.logprob < 0


def test_stream_matches_generate(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11, stop=["zz"])
    expected = tiny_engine.generate(chat_prompts[2:3], params)[0]
    events = list(tiny_engine.stream(chat_prompts[2], params))
    assert "".join(e.text for e in events) == expected.choices[0].text
    assert [e.token_id for e in events] == expected.choices[0].token_ids[: len(events)]
    assert events[-1].finish_reason == expected.choices[0].finish_reason
    assert events[-1].completion_tokens == expected.completion_tokens
    assert events[-1].prompt_tokens == expected.prompt_tokens
    assert all(e.finish_reason is None for e in events[:-1])


def test_chat_template_renders_as_training_does(tiny_engine: Engine, tiny_model_dir: Path) -> None:
    """The prompt is the checkpoint's own template: a training conversation starts with it verbatim."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tiny_engine.render_chat(messages)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tok = load_tokenizer(tiny_model_dir)
    trained = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Hello!"}], tokenize=False
    )
    assert trained == prompt + "Hello!<|im_end|>\n"
    assert (
        tiny_engine.encode(prompt) == tok(trained)["input_ids"][: len(tiny_engine.encode(prompt))]
    )


def test_prompt_too_long_and_bad_params(tiny_engine: Engine) -> None:
    with pytest.raises(PromptTooLongError, match="context window"):
        tiny_engine.generate(["hello"], SamplingParams(max_new_tokens=tiny_engine.context_length))
    with pytest.raises(ValueError, match="temperature"):
        tiny_engine.generate(["hello"], SamplingParams(temperature=-1))
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint"):
        Engine.load("/nonexistent/checkpoint")


def test_mlflow_model_uri_loads(make_cfg, tiny_model_dir: Path, chat_prompts: list[str]) -> None:
    cfg = make_cfg()
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("test-register", cfg) as run:
        info = tracker.register_model(run, tiny_model_dir, "tiny-chat")
    tracker.set_alias("tiny-chat", "champion", info.version)
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=5)
    expected = Engine.load(tiny_model_dir).generate(chat_prompts[:1], params)
    for uri in (f"models:/tiny-chat/{info.version}", "models:/tiny-chat@champion"):
        engine = Engine.load(uri, tracking_uri=cfg.tracking.tracking_uri)
        assert engine.model_id == uri
        assert _ids(engine.generate(chat_prompts[:1], params)) == _ids(expected)
    with pytest.raises(ValueError, match="no alias @missing"):
        Engine.load("models:/tiny-chat@missing", tracking_uri=cfg.tracking.tracking_uri)
