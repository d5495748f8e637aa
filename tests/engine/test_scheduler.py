"""The scheduler on the real tiny Llama: concurrent requests share decode steps and stay exact."""

from __future__ import annotations

import asyncio

import pytest

from arenaflow.engine import Engine, QueueFullError, SamplingParams, Scheduler


def _params(i: int, max_new_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=40 + i)


def test_concurrent_requests_join_the_running_batch(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    expected = [tiny_engine.generate([p], _params(i))[0] for i, p in enumerate(chat_prompts)]

    async def main() -> tuple[list, list[int], dict]:
        async with Scheduler(tiny_engine, max_batch_size=8) as sched:
            sizes: list[int] = []

            async def staggered(i: int):
                await asyncio.sleep(0.003 * i)
                return await sched.submit(chat_prompts[i], _params(i))

            async def watch():
                while True:
                    sizes.append(sched.stats()["last_batch_size"])
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(staggered(i) for i in range(len(chat_prompts))))
            watcher.cancel()
            return results, sizes, sched.stats()

    results, sizes, stats = asyncio.run(main())
    assert [r.choices[0].token_ids for r in results] == [e.choices[0].token_ids for e in expected]
    assert max(sizes) > 1  # requests that arrived apart were decoded in one batch
    assert stats["completed"] == len(chat_prompts) and stats["queue_depth"] == 0
    assert stats["running"] == 0 and stats["tokens_generated"] >= 12 * len(chat_prompts)


def test_stream_and_cancellation_free_the_slot(
    tiny_engine: Engine, chat_prompts: list[str]
) -> None:
    async def main() -> tuple[str, str, dict, dict]:
        async with Scheduler(tiny_engine, max_batch_size=4) as sched:
            full = await sched.submit(chat_prompts[1], _params(1))
            streamed = ""
            async for event in sched.stream(chat_prompts[1], _params(1)):
                streamed += event.text
            agen = sched.stream(chat_prompts[0], SamplingParams(max_new_tokens=1000))
            async for _ in agen:
                break
            await agen.aclose()
            for _ in range(200):
                if sched.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            during = sched.stats()
            after = await sched.submit(chat_prompts[2], _params(2, 3))
            assert after.completion_tokens == 3
            return full.choices[0].text, streamed, during, sched.stats()

    full, streamed, during, stats = asyncio.run(main())
    assert streamed == full
    assert during["running"] == 0 and during["running_sequences"] == 0
    assert stats["cancelled"] == 1 and stats["completed"] == 3
    assert stats["tokens_generated"] < 1000


def test_full_queue_is_rejected(tiny_engine: Engine, chat_prompts: list[str]) -> None:
    async def main() -> tuple[int, int, dict]:
        sched = Scheduler(tiny_engine, max_batch_size=1, max_queue=2)
        tasks = [
            asyncio.ensure_future(sched.submit(chat_prompts[0], _params(i, 20))) for i in range(8)
        ]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await sched.close()
        rejected = sum(isinstance(o, QueueFullError) for o in outcomes)
        done = sum(not isinstance(o, BaseException) for o in outcomes)
        return rejected, done, sched.stats()

    rejected, done, stats = asyncio.run(main())
    assert rejected >= 5 and done >= 1 and rejected + done == 8
    assert stats["rejected"] == rejected


def test_bad_params_raise_before_queueing(tiny_engine: Engine) -> None:
    async def main() -> None:
        async with Scheduler(tiny_engine) as sched:
            with pytest.raises(ValueError, match="top_p"):
                await sched.submit("hi", SamplingParams(top_p=0))
            assert sched.stats()["queue_depth"] == 0

    asyncio.run(main())
