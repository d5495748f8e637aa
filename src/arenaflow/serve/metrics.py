"""Prometheus metrics of one app: requests, latencies, time to first token, tokens, queue depth, batch size.

Each app owns its `CollectorRegistry`, so several apps (tests, blue/green in one process) never
share or clash over global metrics. Scheduler state (queue depth, running rows, last batch size)
is read at scrape time, one series per served model (label `model`): the models that share one
base's batch (adapters) each count their own requests, rows and tokens, while `steps` and
`last_batch_size` are that one batch's, the same in each of its models; batch sizes of decode steps
are sampled into a histogram by a background task, so a scrape after a burst still shows how
large the batches were.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from arenaflow.serve.memory import MemoryPlan

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


StatsFn = Callable[[], dict[str, dict[str, Any]]]  # served model name -> scheduler.stats()


class _SchedulerCollector:
    """Reads every model's `scheduler.stats()` on every scrape."""

    def __init__(self, stats: StatsFn) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        by_model = self._stats() or {}
        gauges = {
            "queue_depth": "requests waiting for a batch row",
            "running": "requests being decoded",
            "running_sequences": "batch rows being decoded (n choices = n rows)",
            "last_batch_size": "rows in the last decode step of this model's batch (all its adapters)",
        }
        for key, doc in gauges.items():
            g = GaugeMetricFamily(f"arenaflow_scheduler_{key}", doc, labels=["model"])
            for model, stats in by_model.items():
                g.add_metric([model], stats.get(key, 0))
            yield g
        counters = {
            "steps": "decode steps run by the batch this model decodes in (shared by a base's adapters)",
            "tokens_generated": "tokens decoded",
            "completed": "requests completed",
            "rejected": "requests rejected because the queue was full",
            "cancelled": "requests cancelled (client went away)",
            "failed": "requests failed by a model error",
        }
        for key, doc in counters.items():
            c = CounterMetricFamily(f"arenaflow_scheduler_{key}", doc, labels=["model"])
            for model, stats in by_model.items():
                c.add_metric([model], stats.get(key, 0))
            yield c


class ServeMetrics:
    """The app's metrics; `render()` is the /metrics body."""

    def __init__(self, stats: StatsFn) -> None:
        self.registry = CollectorRegistry()
        self._stats = stats
        r = self.registry
        self.requests = Counter(
            "arenaflow_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "arenaflow_request_latency_seconds",
            "request latency (streams: until the last chunk)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "arenaflow_time_to_first_token_seconds",
            "time from request to the first generated token",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "arenaflow_prompt_tokens", "prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "arenaflow_generation_tokens", "completion tokens generated", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "arenaflow_batch_size",
            "rows per decode step, sampled while generating",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_size_peak = Gauge(
            "arenaflow_batch_size_peak", "largest decode batch seen", ["model"], registry=r
        )
        self.ready = Gauge("arenaflow_ready", "1 when the models are loaded", registry=r)
        self.model_memory = Gauge(
            "arenaflow_model_memory_estimate_bytes",
            "start-up estimate of a model's memory (weights + full KV cache)",
            ["model"],
            registry=r,
        )
        self.memory_total = Gauge(
            "arenaflow_memory_estimate_total_bytes",
            "start-up estimate of all served models' memory",
            registry=r,
        )
        self.memory_budget = Gauge(
            "arenaflow_memory_budget_bytes",
            "memory the models may use: serve.memory_headroom x available at start-up",
            registry=r,
        )
        r.register(_SchedulerCollector(stats))
        self._peak: dict[str, int] = {}

    def set_memory(self, plan: MemoryPlan) -> None:
        for m in plan.models:
            self.model_memory.labels(m.name).set(m.total_bytes)
        self.memory_total.set(plan.total_bytes)
        self.memory_budget.set(plan.budget_bytes)

    def observe_usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)

    async def sample_batches(self, interval_s: float = 0.01) -> None:
        """Observe the batch size of every model's decode steps seen (runs until cancelled)."""
        last_steps: dict[str, int] = {}
        while True:
            for model, stats in (self._stats() or {}).items():
                steps = int(stats.get("steps", 0))
                if steps != last_steps.get(model, 0):
                    size = int(stats.get("last_batch_size", 0))
                    self.batch_size.labels(model).observe(size)
                    if size > self._peak.get(model, 0):
                        self._peak[model] = size
                        self.batch_size_peak.labels(model).set(size)
                    last_steps[model] = steps
            await asyncio.sleep(interval_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@contextlib.asynccontextmanager
async def batch_sampler(metrics: ServeMetrics):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(metrics.sample_batches())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
