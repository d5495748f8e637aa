"""`Scheduler`: an asyncio front for one `Engine` that batches concurrent requests (continuous batching).

A worker thread owns the running batch. Between two decode steps it admits waiting requests into
free rows, so a request that arrives mid-generation starts at the next step instead of waiting
for the batch to drain. Results and stream events cross back to the event loop thread-safely;
cancelling a stream frees its rows at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from arenaflow.engine.api import GenerationResult, QueueFullError, SamplingParams, StreamEvent
from arenaflow.engine.batch import Request
from arenaflow.engine.engine import Engine

log = logging.getLogger(__name__)

_DONE = object()
_COUNTERS = ("completed", "rejected", "cancelled", "failed", "tokens_generated")
_ALL = object()  # stats over every adapter's requests


class Scheduler:
    """Queue + worker thread around an engine; `submit` / `stream` are safe from many coroutines."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._queue: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._batch = engine.new_batch()
        self._running: dict[int, Request] = {}
        # lifetime counters by the adapter the requests decode with (None: the base model)
        self._counts: dict[str | None, dict[str, int]] = {}
        self._started_at = time.monotonic()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent; `submit`/`stream` start it on first use)."""
        with self._cond:
            if self._thread is not None:
                return
            self._closed = False
            self._thread = threading.Thread(
                target=self._work, name="arenaflow-scheduler", daemon=True
            )
            self._thread.start()

    async def close(self) -> None:
        """Stop the worker; requests still queued or running fail with RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def __aenter__(self) -> Scheduler:
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------------------
    async def submit(
        self, prompt: str, params: SamplingParams, *, engine: Engine | None = None
    ) -> GenerationResult:
        """Generate for one prompt; raises QueueFullError, PromptTooLongError or ValueError.

        `engine`: a view of this scheduler's model (`Engine.with_adapter`) that makes the request,
        so its rows decode with that adapter in the shared batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(outcome: GenerationResult | BaseException) -> None:
            _call_in_loop(loop, _settle, future, outcome)

        request = (engine or self.engine).make_request(prompt, params, on_done=done)
        self._enqueue(request)
        try:
            return await future
        except asyncio.CancelledError:
            request.cancelled = True
            raise

    async def stream(
        self, prompt: str, params: SamplingParams, *, engine: Engine | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Events of one request as they are decoded; closing the iterator early cancels it
        (`engine` as in `submit`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event: StreamEvent) -> None:
            _call_in_loop(loop, events.put_nowait, event)

        def on_done(outcome: GenerationResult | BaseException) -> None:
            item = outcome if isinstance(outcome, BaseException) else _DONE
            _call_in_loop(loop, events.put_nowait, item)

        request = (engine or self.engine).make_request(
            prompt, params, on_event=on_event, on_done=on_done
        )
        self._enqueue(request)
        try:
            while True:
                item = await events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.done:
                request.cancelled = True

    def stats(self, adapter: Any = _ALL) -> dict[str, Any]:
        """Queue depth, rows running, the last decode step's batch size and lifetime counters.

        `adapter` (a peft adapter name, None for the base): the requests, rows, tokens and
        counters of that adapter's requests alone (one served model of a shared base); the
        decode steps and the last step's batch size stay the shared batch's."""
        mine = (lambda r: True) if adapter is _ALL else (lambda r: r.adapter == adapter)
        with self._cond:
            queued = sum(1 for r in self._queue if mine(r))
            running = [r for r in list(self._running.values()) if mine(r)]
            counts = dict.fromkeys(_COUNTERS, 0)
            for key, c in list(self._counts.items()):
                if adapter is _ALL or key == adapter:
                    counts = {k: counts[k] + c[k] for k in _COUNTERS}
        counts["tokens_generated"] += sum(_generated(r) for r in running)
        batch = self._batch
        return {
            "queue_depth": queued,
            "running": len(running),
            "running_sequences": sum(1 for row in list(batch.rows) if mine(row.request)),
            "last_batch_size": batch.last_batch_size,
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "steps": batch.steps,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            **counts,
        }

    def _count(self, request: Request, outcome: str) -> None:
        """Count a request that left the scheduler: completed, failed, cancelled or rejected.
        It leaves the running set under the same lock, so a scrape never sees its tokens in
        neither place (the counters stay monotonic, as Prometheus reads them)."""
        with self._cond:
            self._running.pop(id(request), None)
            c = self._counts.setdefault(request.adapter, dict.fromkeys(_COUNTERS, 0))
            c[outcome] += 1
            c["tokens_generated"] += _generated(request)

    def _enqueue(self, request: Request) -> None:
        self.start()
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            if len(self._queue) >= self.max_queue:
                self._count(request, "rejected")
                raise QueueFullError(
                    f"generation queue is full ({self.max_queue} waiting); retry later"
                )
            self._queue.append(request)
            self._cond.notify()

    # -- worker --------------------------------------------------------------------------------
    def _take(self) -> list[Request]:
        """Waiting requests that fit in the free rows (the first one always fits an empty batch)."""
        admit: list[Request] = []
        free = self.max_batch_size - len(self._batch)
        while self._queue:
            head = self._queue[0]
            if head.cancelled:
                self._queue.popleft()
                self._count(head, "cancelled")
                _notify(head, RuntimeError("request cancelled before it started"))
                continue
            fits = head.params.n <= free or (not admit and not len(self._batch))
            if not fits:
                break
            free -= head.params.n
            admit.append(self._queue.popleft())
        return admit

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and not len(self._batch):
                    self._cond.wait()
                if self._closed:
                    break
                admit = self._take()
            try:
                with self.engine.lock:
                    finished = []
                    if admit:
                        self._running.update({id(r): r for r in admit})
                        finished += self._batch.admit(admit)
                    finished += self._batch.step()
            except Exception as e:  # a model error fails the batch, not the server
                failed = self._batch.cancel_all(e) + admit
                for r in {id(r): r for r in failed}.values():
                    self._count(r, "failed")
                    _notify(r, e)
                continue
            for r in finished:
                if r.error is not None:  # this request failed alone; its batch-mates go on
                    self._count(r, "failed")
                    _notify(r, r.error)
                elif r.cancelled and not r.done:
                    self._count(r, "cancelled")
                    _notify(r, RuntimeError("request cancelled"))
                else:
                    self._count(r, "completed")
                    _notify(r, r.build_result())
        self._shutdown()

    def _shutdown(self) -> None:
        error = RuntimeError("scheduler closed before the request finished")
        pending = list(self._queue) + list(self._running.values())
        self._queue.clear()
        self._running.clear()
        if len(self._batch):
            self._batch.cancel_all(error)
        for r in pending:
            _notify(r, error)


def _generated(request: Request) -> int:
    return sum(s.generated for s in request.seqs)


def _notify(request: Request, outcome: GenerationResult | BaseException) -> None:
    if request.on_done is not None:
        request.on_done(outcome)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Hand a callback to the caller's event loop; a loop that has gone away just drops it."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future, outcome: GenerationResult | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
