"""One arena turn: both models' answers opened together (so a full queue or a bad prompt is an
HTTP error before the stream starts) and streamed as one SSE stream; the turn joins the battle
only when both answers are complete."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from arenaflow.arena.limits import Battle
from arenaflow.engine import StreamEvent
from arenaflow.serve.errors import error_body
from arenaflow.serve.generation import map_engine_errors
from arenaflow.serve.streams import merge_streams, sse_event

log = logging.getLogger(__name__)

SIDES = ("a", "b")
Opened = list[tuple[AsyncIterator[StreamEvent], StreamEvent]]


async def open_both(sides: list[tuple[Any, str, Any]], retry_after: str) -> Opened:
    """Each side's stream with its first event read; on any failure both are closed, then raised."""
    iters = [sched.stream(p, sp).__aiter__() for sched, p, sp in sides]
    firsts = await asyncio.gather(
        *(map_engine_errors(it.__anext__(), retry_after) for it in iters),
        return_exceptions=True,
    )
    for first in firsts:
        if isinstance(first, BaseException):
            for it in iters:
                with contextlib.suppress(Exception):
                    await it.aclose()  # type: ignore[attr-defined]
            raise first
    return list(zip(iters, firsts, strict=True))


async def both_answers(
    battle: Battle,
    messages: list[list[dict[str, str]]],
    opened: Opened,
) -> AsyncIterator[str]:
    """Both answers as one SSE stream of `{"side", "text"}` / `{"side", "finish_reason"}`,
    then `{"done": true}`; the turn joins the battle only when both answers are complete."""
    texts = ["", ""]
    stream = merge_streams(opened)
    try:
        async for side, item in stream:
            if isinstance(item, Exception):
                log.error("arena generation failed: %s", item)
                yield sse_event(
                    error_body(503, f"generation failed: {item}; send the prompt again")
                )
                return
            if item.text:
                texts[side] += item.text
                yield sse_event({"side": SIDES[side], "text": item.text})
            if item.finish_reason:
                yield sse_event({"side": SIDES[side], "finish_reason": item.finish_reason})
        for i in range(2):
            battle.conversations[i][:] = [
                *messages[i],
                {"role": "assistant", "content": texts[i]},
            ]
        battle.turns += 1
        yield sse_event({"done": True, "turn": battle.turns})
    finally:
        battle.streaming = False
        await stream.aclose()
