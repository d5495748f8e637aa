"""Run judge calls through the cache and the budget, then read verdicts (text, else logprobs).

The runner knows nothing of MT-bench: it takes `JudgeItem`s (one judge call each) and returns one
`ItemResult` per item, so single grading and both orders of a pairwise comparison share one
path for caching, budgets, retries and parse-failure accounting.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from arenaflow.judge.backends import ChatRequest, JudgeBackend
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


@dataclass
class ItemResult:
    judgment: str
    verdict: Verdict
    cached: bool = False
    error: str | None = None  # the call failed for good, or was not made (budget)

    def as_cache_value(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "judgment": self.judgment,
            "score": v.score,
            "winner": v.winner,
            "source": v.source,
            "expected_score": v.expected_score,
            "probs": v.probs,
        }

    @classmethod
    def from_cache(cls, value: dict[str, Any]) -> ItemResult:
        verdict = Verdict(
            score=value.get("score"),
            winner=value.get("winner"),
            source=value.get("source", "text"),
            expected_score=value.get("expected_score"),
            probs=value.get("probs"),
        )
        return cls(judgment=value["judgment"], verdict=verdict, cached=True)


@dataclass
class Budget:
    """A per-run cap on judge calls and tokens; None means unlimited."""

    max_calls: int | None = None
    max_tokens: int | None = None
    calls: int = 0
    tokens: int = 0

    def calls_left(self) -> int | None:
        return None if self.max_calls is None else max(0, self.max_calls - self.calls)

    def exhausted(self) -> str | None:
        if self.max_calls is not None and self.calls >= self.max_calls:
            return f"judge.max_calls={self.max_calls} reached"
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return f"judge.max_tokens_budget={self.max_tokens} reached ({self.tokens} tokens used)"
        return None


@dataclass
class RunStats:
    calls: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    outcomes: Counter = field(
        default_factory=Counter
    )  # text | logprobs | parse_error | error | budget
    budget_message: str | None = None


def run_items(
    items: list[JudgeItem],
    make_backend: Callable[[], JudgeBackend],
    cache: JudgmentCache,
    budget: Budget,
    *,
    logprob_recovery: bool,
    desc: str = "judging",
) -> tuple[dict[str, ItemResult], RunStats]:
    """Judge every item once: cached verdicts are reused, the rest are called in backend-sized
    chunks. The backend is only built (a model loaded, a client opened) when a call is needed."""
    stats = RunStats()
    results: dict[str, ItemResult] = {}
    todo: list[JudgeItem] = []
    for item in items:
        if item.key in results:
            continue
        hit = cache.get(item.key)
        if hit is not None:
            results[item.key] = ItemResult.from_cache(hit)
            stats.cached += 1
        else:
            todo.append(item)
    pending = list({item.key: item for item in todo}.values())
    backend = make_backend() if pending else None
    try:
        _run_pending(pending, backend, cache, budget, stats, results, logprob_recovery, desc)
    finally:
        if backend is not None:
            backend.close()
    for item in items:
        r = results[item.key]
        if r.error:
            stats.outcomes["budget" if r.error.startswith("budget") else "error"] += 1
        elif r.verdict.source == "text":
            stats.outcomes["text"] += 1
        elif r.verdict.source == "logprobs":
            stats.outcomes["logprobs"] += 1
        else:
            stats.outcomes["parse_error"] += 1
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
                stats.budget_message = (
                    f"judge budget exhausted ({reason}); {len(pending)} judgments not made. "
                    "Raise the budget and re-run: finished judgments come from the cache."
                )
                log.warning(stats.budget_message)
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
    completions = backend.complete([item.request for item in chunk])
    unparsed: list[tuple[JudgeItem, ItemResult]] = []
    for item, completion in zip(chunk, completions, strict=True):
        stats.calls += 1
        stats.retries += max(0, completion.attempts - 1)
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        budget.calls += 1
        budget.tokens += completion.prompt_tokens + completion.completion_tokens
        if completion.text is None:
            results[item.key] = ItemResult("", Verdict(), error=completion.error or "no reply")
            continue
        verdict = parse_verdict(completion.text, item.output_format)
        verdict = with_token_probabilities(verdict, completion.tokens, item.output_format)
        result = ItemResult(completion.text, verdict)
        results[item.key] = result
        if result.verdict.parsed:
            cache.put(item.key, backend.model_name, result.as_cache_value())
        else:
            unparsed.append((item, result))
    if not (logprob_recovery and backend.supports_logprobs and unparsed):
        return
    for output_format in sorted({item.output_format for item, _ in unparsed}):
        group = [(i, r) for i, r in unparsed if i.output_format == output_format]
        tops = backend.verdict_logprobs(
            [i.request for i, _ in group], [r.judgment for _, r in group], output_format
        )
        prompt_tokens, completion_tokens = getattr(backend, "last_usage", (0, 0))
        stats.calls += len(group)
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        budget.calls += len(group)
        budget.tokens += prompt_tokens + completion_tokens
        for (item, result), top in zip(group, tops, strict=True):
            if top is None:
                continue
            verdict = verdict_from_logprobs(top, output_format)
            if verdict.parsed:
                result.verdict = verdict
                cache.put(item.key, backend.model_name, result.as_cache_value())
