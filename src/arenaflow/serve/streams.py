"""Several scheduler streams read as one: the events of every opened request, in arrival order."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from arenaflow.engine import StreamEvent

Opened = list[tuple[AsyncIterator[StreamEvent], StreamEvent]]


async def merge_streams(opened: Opened) -> AsyncIterator[tuple[int, StreamEvent | Exception]]:
    """`(i, event)` for the i-th opened stream (its first event already read), as events arrive;
    a stream that fails gives `(i, exception)` once and ends. Closing this generator early (a
    client that left) cancels the readers and closes every stream, which frees its rows."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, it: AsyncIterator[StreamEvent], first: StreamEvent) -> None:
        try:
            await queue.put((i, first))
            async for ev in it:
                await queue.put((i, ev))
        except Exception as e:  # the scheduler failed this request
            await queue.put((i, e))
        finally:
            await queue.put((i, end))

    tasks = [asyncio.create_task(pump(i, it, f)) for i, (it, f) in enumerate(opened)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for it, _ in opened:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]


def sse_event(obj: dict[str, Any]) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
