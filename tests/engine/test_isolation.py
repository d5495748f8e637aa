"""One request cannot harm the rows it shares a batch with: bad sampling values, a failing row."""

from __future__ import annotations

import asyncio

import pytest
import torch

from arenaflow.engine import Engine, RequestFailedError, SamplingParams, Scheduler
from arenaflow.engine.batch import _sample_row


def test_tiny_temperature_is_greedy_in_a_shared_batch(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    greedy = SamplingParams(max_new_tokens=8)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    alone = tiny_engine.generate(chat_prompts[:2], [greedy, sampled])
    tiny = SamplingParams(max_new_tokens=8, temperature=1e-40)
    results = tiny_engine.generate(chat_prompts[:3], [greedy, sampled, tiny])
    assert [r.choices[0].token_ids for r in results[:2]] == [r.choices[0].token_ids for r in alone]
    assert tiny.temperature == 0.0  # normalised to greedy
    alone_greedy = tiny_engine.generate([chat_prompts[2]], SamplingParams(max_new_tokens=8))
    assert results[2].choices[0].token_ids == alone_greedy[0].choices[0].token_ids
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            SamplingParams(temperature=bad).validate()


def test_sampler_survives_non_finite_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="no finite logit"):
        _sample_row(torch.full((5,), -torch.inf), 1.0, 1.0, gen)
    spiky = torch.tensor([0.0, torch.inf, 1.0, 0.0])  # softmax of inf is NaN: greedy instead
    assert int(_sample_row(spiky, 1.0, 1.0, gen)) == 1
    assert int(_sample_row(torch.tensor([0.0, 3.0, 1.0]), 1e-5, 0.5, gen)) == 1


def test_a_failing_row_fails_alone(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    """A request whose own callback raises mid-generation fails; its batch-mates finish exactly."""
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=i) for i in range(3)]
    expected = tiny_engine.generate(chat_prompts[:3], params)
    seen = {"events": 0}

    def explode(_event) -> None:
        seen["events"] += 1
        if seen["events"] == 3:
            raise OSError("client went away")

    requests = [
        tiny_engine.make_request(chat_prompts[0], params[0]),
        tiny_engine.make_request(chat_prompts[1], params[1], on_event=explode),
        tiny_engine.make_request(chat_prompts[2], params[2]),
    ]
    tiny_engine.run_requests(requests)
    assert isinstance(requests[1].error, RequestFailedError)
    assert "client went away" in str(requests[1].error)
    assert seen["events"] == 3  # its rows left the batch when it failed
    for i in (0, 2):
        assert requests[i].error is None
        assert requests[i].build_result().choices[0].token_ids == expected[i].choices[0].token_ids


def test_scheduler_fails_one_request_and_serves_the_rest(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    """Through the scheduler: the failing request raises, the others complete, counters say so."""

    async def main():
        async with Scheduler(tiny_engine, max_batch_size=8) as sched:
            good = [
                sched.submit(p, SamplingParams(max_new_tokens=12, temperature=1e-30))
                for p in chat_prompts[:3]
            ]
            request = tiny_engine.make_request(chat_prompts[3], SamplingParams(max_new_tokens=12))
            request.prompt_ids = [tiny_engine.model.config.vocab_size + 10]  # cannot be embedded
            loop = asyncio.get_running_loop()
            failed: asyncio.Future = loop.create_future()
            request.on_done = lambda out: loop.call_soon_threadsafe(failed.set_result, out)
            sched._enqueue(request)
            results = await asyncio.gather(*good)
            return results, await failed, sched.stats()

    results, outcome, stats = asyncio.run(main())
    greedy = tiny_engine.generate(chat_prompts[:3], SamplingParams(max_new_tokens=12))
    assert [r.choices[0].token_ids for r in results] == [g.choices[0].token_ids for g in greedy]
    assert isinstance(outcome, RequestFailedError)
    assert stats["failed"] == 1 and stats["completed"] == 3 and stats["running"] == 0
