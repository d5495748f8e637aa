"""Run judge calls through the cache and the budget, then read verdicts (text, else logprobs).

The runner knows nothing of MT-bench: it takes `JudgeItem`s (one judge call each) and returns one
`ItemResult` per item, so single grading and both orders of a pairwise comparison share one
path for caching, budgets, retries and parse-failure accounting.

Every reply is cached the moment it returns, its raw text included, whether or not a verdict
could be read from it: a crash, a kill or a failing neighbour in the same batch never loses a
paid reply, and a rerun (or a better parser) re-reads the text instead of paying again. Every
request, retries and logprob recoveries included, reserves its share of the budget before it is
sent, so concurrent calls cannot overrun `judge.max_calls` or `judge.max_tokens_budget`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from arenaflow.judge.backends import ChatRequest, Completion, JudgeBackend, Recovery
from arenaflow.judge.cache import JudgmentCache
from arenaflow.judge.verdicts import (
    Verdict,
    parse_verdict,
    verdict_from_logprobs,
    with_token_probabilities,
)

log = logging.getLogger(__name__)


@dataclass
class JudgeItem:
    """One judge call: the chat, how to read its verdict, and the key it is cached under."""

    key: str
    request: ChatRequest
    output_format: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def structured(self) -> bool:
        """The judge was asked for a JSON verdict under a schema (`judge.structured`)."""
        return self.request.schema is not None


@dataclass
class ItemResult:
    judgment: str
    verdict: Verdict
    cached: bool = False
    error: str | None = None  # the call failed for good, or was not made (budget)
    attempts: int = 0  # requests sent for it in this run, retries and recovery included
    recovered: bool = False  # a logprob recovery call answered (whatever it found)

    def as_cache_value(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "judgment": self.judgment,
            "score": v.score,
            "winner": v.winner,
            "source": v.source,
            "expected_score": v.expected_score,
            "probs": v.probs,
            "recovered": self.recovered,
        }

    @classmethod
    def from_cache(
        cls, value: dict[str, Any], output_format: str, structured: bool = False
    ) -> ItemResult:
        """The stored reply, re-read: the text is parsed again (a verdict the parser of the time
        missed is found now), and the stored verdict is kept where the text still agrees."""
        stored = Verdict(
            score=value.get("score"),
            winner=value.get("winner"),
            source=value.get("source", "text"),
            expected_score=value.get("expected_score"),
            probs=value.get("probs"),
        )
        reparsed = parse_verdict(value["judgment"], output_format, structured)
        agrees = (reparsed.score, reparsed.winner) == (stored.score, stored.winner)
        # the stored verdict while the text agrees, or holds none beside a logprob reading
        keep = agrees if stored.source == "text" else not reparsed.parsed
        verdict = stored if keep and stored.source != "none" else reparsed
        verdict.error = reparsed.error  # why the text holds none, if it does not
        recovered = bool(value.get("recovered", stored.source == "logprobs"))
        return cls(value["judgment"], verdict, cached=True, recovered=recovered)


class Budget:
    """A per-run cap on judge requests and tokens (None: unlimited), shared by concurrent calls.

    `reserve` holds one request and an upper bound on its tokens before it is sent; `settle`
    swaps the bound for the tokens used. Spent plus held never passes the cap: a request that
    does not fit waits while others are in flight (their unused bounds come back), and is
    refused only when nothing in flight could make room.
    """

    def __init__(self, max_calls: int | None = None, max_tokens: int | None = None) -> None:
        self.max_calls, self.max_tokens = max_calls, max_tokens
        self.calls = 0  # requests sent or being sent
        self.tokens = 0  # tokens spent by requests that returned
        self.held = 0  # token bounds of requests in flight
        self.in_flight = 0
        self.refused: str | None = None  # why the budget first said no
        self._cond = threading.Condition()

    def calls_left(self) -> int | None:
        return None if self.max_calls is None else max(0, self.max_calls - self.calls)

    def reserve(self, tokens: int, *, wait: bool = True) -> str | None:
        with self._cond:
            while True:
                if self.max_calls is not None and self.calls >= self.max_calls:
                    reason = f"judge.max_calls={self.max_calls} reached"
                elif self.max_tokens is not None and (
                    self.tokens + self.held + tokens > self.max_tokens
                ):
                    if self.in_flight and wait:
                        self._cond.wait()
                        continue
                    reason = (
                        f"judge.max_tokens_budget={self.max_tokens} reached "
                        f"({self.tokens} tokens used; the next call may need up to {tokens})"
                    )
                    if self.in_flight:  # not waiting: the caller retries once its calls return
                        return reason
                else:
                    self.calls += 1
                    self.held += tokens
                    self.in_flight += 1
                    return None
                self.refused = self.refused or reason
                return reason

    def settle(self, reserved: int, used: int) -> None:
        with self._cond:
            self.held -= reserved
            self.tokens += used
            self.in_flight -= 1
            self._cond.notify_all()

    def exhausted(self) -> str | None:
        if self.refused:
            return self.refused
        if self.max_calls is not None and self.calls >= self.max_calls:
            return f"judge.max_calls={self.max_calls} reached"
        return None


@dataclass
class RunStats:
    calls: int = 0  # judge calls that reached the judge (recovery calls included)
    requests: int = 0  # requests sent: calls plus their retries
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    outcomes: Counter = field(
        default_factory=Counter
    )  # text | logprobs | parse_error | error | budget
    parse_errors: Counter = field(default_factory=Counter)  # why a text held no verdict -> count
    budget_message: str | None = None

    def count(self, attempts: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.calls += attempts > 0
        self.requests += attempts
        self.retries += max(0, attempts - 1)
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens


def run_items(
    items: list[JudgeItem],
    make_backend: Callable[[], JudgeBackend],
    cache: JudgmentCache,
    budget: Budget,
    *,
    logprob_recovery: bool,
    desc: str = "judging",
) -> tuple[dict[str, ItemResult], RunStats]:
    """Judge every item once: cached replies are re-read, the rest are called in backend-sized
    chunks. The backend is only built (a model loaded, a client opened) when a call is needed."""
    stats = RunStats()
    results: dict[str, ItemResult] = {}
    pending: dict[str, JudgeItem] = {}
    unrecovered: list[tuple[JudgeItem, ItemResult]] = []
    for item in items:
        if item.key in results or item.key in pending:
            continue
        hit = cache.get(item.key)
        if hit is None:
            pending[item.key] = item
            continue
        result = ItemResult.from_cache(hit, item.output_format, item.structured)
        results[item.key] = result
        stats.cached += 1
        if logprob_recovery and not result.verdict.parsed and not result.recovered:
            unrecovered.append((item, result))  # its recovery failed or was not asked for
    backend = make_backend() if pending or unrecovered else None
    try:
        if backend is not None and unrecovered and backend.supports_logprobs:
            _recover(unrecovered, backend, cache, budget, stats)
        _run_pending(
            list(pending.values()), backend, cache, budget, stats, results, logprob_recovery, desc
        )
    finally:
        if backend is not None:
            backend.close()
    for item in items:
        r = results[item.key]
        if r.error:
            stats.outcomes["budget" if r.error.startswith("budget") else "error"] += 1
        elif r.verdict.source == "text":
            stats.outcomes["text"] += 1
        else:
            stats.outcomes["logprobs" if r.verdict.source == "logprobs" else "parse_error"] += 1
            stats.parse_errors[r.verdict.error or "no verdict"] += 1
    if stats.outcomes["budget"]:
        stats.budget_message = (
            f"judge budget exhausted ({budget.exhausted()}); {stats.outcomes['budget']} "
            "judgments not made. Raise the budget and re-run: finished judgments come from "
            "the cache."
        )
        log.warning(stats.budget_message)
    return results, stats


def _run_pending(
    pending: list[JudgeItem],
    backend: JudgeBackend | None,
    cache: JudgmentCache,
    budget: Budget,
    stats: RunStats,
    results: dict[str, ItemResult],
    logprob_recovery: bool,
    desc: str,
) -> None:
    with tqdm(total=len(pending), desc=desc, unit="call", disable=not pending) as bar:
        while pending and backend is not None:
            reason = budget.exhausted()
            if reason:
                for item in pending:
                    results[item.key] = ItemResult("", Verdict(), error=f"budget: {reason}")
                break
            size = backend.batch_size
            left = budget.calls_left()
            if left is not None:
                size = min(size, left)
            chunk, pending = pending[:size], pending[size:]
            _judge_chunk(chunk, backend, cache, budget, stats, results, logprob_recovery)
            bar.update(len(chunk))


def _judge_chunk(
    chunk: list[JudgeItem],
    backend: JudgeBackend,
    cache: JudgmentCache,
    budget: Budget,
    stats: RunStats,
    results: dict[str, ItemResult],
    logprob_recovery: bool,
) -> None:
    unparsed: list[tuple[JudgeItem, ItemResult]] = []

    def returned(i: int, completion: Completion) -> None:
        item = chunk[i]
        stats.count(completion.attempts, completion.prompt_tokens, completion.completion_tokens)
        if completion.text is None:
            error = completion.error or "no reply"
            results[item.key] = ItemResult("", Verdict(), error=error, attempts=completion.attempts)
            return
        verdict = parse_verdict(completion.text, item.output_format, item.structured)
        verdict = with_token_probabilities(
            verdict, completion.tokens, item.output_format, item.structured
        )
        result = ItemResult(completion.text, verdict, attempts=completion.attempts)
        results[item.key] = result
        cache.put(item.key, backend.model_name, result.as_cache_value())  # paid: never lost
        if not verdict.parsed:
            unparsed.append((item, result))

    backend.complete([item.request for item in chunk], gate=budget, on_result=returned)
    if logprob_recovery and backend.supports_logprobs and unparsed:
        _recover(unparsed, backend, cache, budget, stats)


def _recover(
    unparsed: list[tuple[JudgeItem, ItemResult]],
    backend: JudgeBackend,
    cache: JudgmentCache,
    budget: Budget,
    stats: RunStats,
) -> None:
    """Ask for the verdict alone and read it from token probabilities; each answer is cached as
    it returns. A failed or refused recovery leaves the reply unrecovered, for the next run."""
    for output_format in sorted({item.output_format for item, _ in unparsed}):
        group = [(i, r) for i, r in unparsed if i.output_format == output_format]

        def returned(n: int, rec: Recovery, group: list = group, fmt: str = output_format) -> None:
            item, result = group[n]
            stats.count(rec.attempts, rec.prompt_tokens, rec.completion_tokens)
            result.attempts += rec.attempts
            if rec.error is not None:
                return
            result.recovered = True
            if rec.top is not None:
                verdict = verdict_from_logprobs(rec.top, fmt)
                if verdict.parsed:
                    verdict.error = result.verdict.error  # the text's parse failure stays told
                    result.verdict = verdict
            cache.put(item.key, backend.model_name, result.as_cache_value())

        backend.verdict_logprobs(
            [i.request for i, _ in group],
            [r.judgment for _, r in group],
            output_format,
            gate=budget,
            on_result=returned,
        )
