"""One HTTP request's generation: submit to a model's scheduler, bound it in time, stream it as SSE.

A plain request is cancelled when its client disconnects (before: it ran to max_tokens for nobody);
every request has `serve.request_timeout_s` (504, or a final error event in a stream). Scheduler
errors become HTTP errors in `map_engine_errors`, which the arena uses too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from arenaflow.engine import (
    GenerationResult,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
    SamplingParams,
    StreamEvent,
)
from arenaflow.serve.errors import APIError, error_body
from arenaflow.serve.responses import Body
from arenaflow.serve.slots import ModelSlot, ServeState
from arenaflow.serve.streams import merge_streams, sse_event
from arenaflow.serve.tool_stream import ToolCallStream
from arenaflow.serve.tools import ToolPlan, finish_for

log = logging.getLogger(__name__)

Opened = list[tuple[AsyncIterator[StreamEvent], StreamEvent]]


async def map_engine_errors(aw: Awaitable[Any], retry_after: str) -> Any:
    """Scheduler errors -> HTTP errors (429 with Retry-After, 400 for prompts, 503 when closing)."""
    try:
        return await aw
    except QueueFullError as e:
        raise APIError(429, f"{e}", code="queue_full", headers={"Retry-After": retry_after}) from e
    except RequestFailedError as e:
        raise APIError(500, str(e), code="generation_failed") from e
    except PromptTooLongError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from e
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from e
    except RuntimeError as e:
        raise APIError(503, f"the server could not finish the request: {e}") from e


async def disconnected(http: Request) -> None:
    """Returns when the client has gone (the ASGI server sends `http.disconnect`)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class Generation:
    """Generation for one request to one model slot, with its time limit and response bodies."""

    def __init__(
        self,
        state: ServeState,
        slot: ModelSlot,
        endpoint: str,
        chat: bool,
        tools: ToolPlan | None = None,
    ) -> None:
        self.state, self.slot, self.endpoint, self.chat = state, slot, endpoint, chat
        self.tools = tools  # chat with tools: each choice's stream split into content and calls
        self.model = slot.name
        self.body = Body(
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=slot.name,
            system_fingerprint=state.fingerprint,
        )
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        serve = state.cfg.serve
        self.timeout_s = float(serve.request_timeout_s)
        self.deadline = time.monotonic() + self.timeout_s
        self.retry_after = str(int(serve.retry_after_s))

    def _mapped(self, aw: Awaitable[Any]) -> Awaitable[Any]:
        return map_engine_errors(aw, self.retry_after)

    def _timed_out(self) -> APIError:
        return APIError(
            504,
            f"generation did not finish within {self.timeout_s:g} s (serve.request_timeout_s); "
            "ask for fewer tokens or retry later",
            code="timeout",
        )

    def _left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def run(
        self, prompts: list[str], plist: list[SamplingParams], http: Request | None = None
    ) -> list[GenerationResult]:
        """Every prompt's result; cancelled when the client disconnects or the time limit passes."""
        sched = self.slot.scheduler
        tasks = [
            asyncio.ensure_future(self._mapped(sched.submit(p, sp)))
            for p, sp in zip(prompts, plist, strict=True)
        ]
        everything = asyncio.ensure_future(asyncio.gather(*tasks))
        gone = asyncio.ensure_future(disconnected(http)) if http is not None else None
        waiting = [everything, *([gone] if gone else [])]
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=self._left(), return_when=asyncio.FIRST_COMPLETED
            )
            if everything not in done:
                if gone is not None and gone in done:  # nobody will read the answer
                    raise APIError(499, "the client closed the request", code="client_closed")
                raise self._timed_out()
            results = everything.result()
        finally:
            for t in [*tasks, *waiting]:
                t.cancel()
        # without streaming the first token reaches the client with the whole answer
        self.state.metrics.ttft.labels(self.endpoint, self.model).observe(
            time.perf_counter() - self.t0
        )
        for r in results:
            self.state.metrics.observe_usage(self.model, r.prompt_tokens, r.completion_tokens)
        return results

    async def stream(
        self, prompts: list[str], plist: list[SamplingParams], include_usage: bool
    ) -> StreamingResponse:
        """Open every prompt's stream first, so queue-full and bad prompts still get a status code."""
        self.body.include_usage = include_usage
        opened: Opened = []
        try:
            for p, sp in zip(prompts, plist, strict=True):
                it = self.slot.scheduler.stream(p, sp).__aiter__()
                try:
                    first = await self._next(it)
                except BaseException:
                    await it.aclose()  # type: ignore[attr-defined]
                    raise
                opened.append((it, first))
        except BaseException:
            for it, _ in opened:
                await it.aclose()  # type: ignore[attr-defined]
            raise
        return StreamingResponse(
            self._sse(opened, plist[0].n),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _sse(self, opened: Opened, n: int) -> AsyncIterator[str]:
        stream = merge_streams(opened).__aiter__()
        prompt_tokens = completion_tokens = 0
        splitters = [ToolCallStream(self.tools.names) for _ in range(n)] if self.tools else []
        try:
            if self.chat:
                for j in range(n):
                    yield sse_event(self.body.chat_role_chunk(j))
            while True:
                try:
                    i, item = await self._next(stream)
                except StopAsyncIteration:
                    break
                except APIError as e:  # the time limit passed mid-stream
                    yield sse_event(error_body(e.status, e.message, code=e.code))
                    return
                if isinstance(item, Exception):
                    log.error("stream failed: %s", item)
                    yield sse_event(error_body(500, f"generation failed: {item}"))
                    return
                self._observe_first(item)
                if item.prompt_tokens is not None:
                    prompt_tokens += item.prompt_tokens
                    completion_tokens += item.completion_tokens or 0
                if splitters:
                    for chunk in self._tool_chunks(splitters[item.index], item):
                        yield sse_event(chunk)
                elif item.text or item.logprob is not None or item.finish_reason:
                    index = item.index if self.chat else i * n + item.index
                    yield sse_event(self.body.event_chunk(item, index, self.chat))
            self.state.metrics.observe_usage(self.model, prompt_tokens, completion_tokens)
            if self.body.include_usage:
                yield sse_event(self.body.usage_chunk(self.chat, prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    def _tool_chunks(self, split: ToolCallStream, ev: StreamEvent) -> list[dict[str, Any]]:
        """Content withheld while a tool call may be starting; calls as `delta.tool_calls`."""
        deltas = split.feed(ev.text)
        finish = None
        if ev.finish_reason:
            deltas += split.finish()
            finish = finish_for(split.calls, ev.finish_reason)
        return self.body.delta_chunks(ev, deltas, finish)

    def _observe_first(self, ev: StreamEvent) -> None:
        if self.first_token_at is None and ev.token_id is not None:
            self.first_token_at = time.perf_counter()
            self.state.metrics.ttft.labels(self.endpoint, self.model).observe(
                self.first_token_at - self.t0
            )

    async def _next(self, it: AsyncIterator[Any]) -> Any:
        """The iterator's next item within the request's time limit (APIError 504 after it)."""
        try:
            return await asyncio.wait_for(self._mapped(it.__anext__()), self._left())
        except TimeoutError:
            raise self._timed_out() from None
