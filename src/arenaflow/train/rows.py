"""Data parallelism over the cores of one CPU inside one training process (`hardware.batch_threads`).

A CPU run trains in one process whose ops each spread over every core (intra-op threads). With
`batch_threads` > 1, that many threads each run the forward and backward of their share of the
micro-batch with one intra-op thread instead, so every GEMM, attention and element-wise op runs
whole on one core and the cores only meet at the step's end. Weights are shared (one copy); the
shares' gradients are summed in a fixed order, so a run is deterministic. Measured on a 2-core
CPU (SmolLM2-135M, 4 rows of up to 465 tokens): a bare forward/backward loop gained 1.05-1.2x, the
recipe's step 1.02-1.08x in paired A/B steps, and whole runs showed no difference beyond this
machine's noise, so it is off by default (`1`); many-core CPUs, where one op splits worse over
more cores, are where to try it.

Costs: one extra gradient buffer per extra thread (the memory preflight counts it), and only
micro-batches of several rows split (a single row runs on the intra-op threads as before).
It applies to one-process fp32 CPU training in eager mode; GPUs, FSDP ranks (one core each
already), mixed precision (autocast is per thread) and compiled layers keep the usual path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")

FP32_PRECISIONS = ("32-true", "32")


def batch_threads(hardware: Any, compiled: bool) -> int:
    """`hardware.batch_threads` resolved: `auto` is torch's intra-op thread count where the
    row-parallel step applies (one fp32 CPU process, eager), else 1; an integer is checked."""
    setting = hardware.get("batch_threads", 1)
    reasons = []
    if hardware.accelerator != "cpu":
        reasons.append(f"accelerator={hardware.accelerator}")
    if hardware.strategy != "single":
        reasons.append(f"strategy={hardware.strategy} (each rank already has its own cores)")
    if str(hardware.precision) not in FP32_PRECISIONS:
        reasons.append(f"precision={hardware.precision} (autocast does not follow threads)")
    if compiled:
        reasons.append("train.compile is on")
    if isinstance(setting, str) and setting.lower() == "auto":
        return 1 if reasons else max(1, torch.get_num_threads())
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"hardware.batch_threads must be auto or an integer >= 1, not {setting!r}")
    if setting > 1 and reasons:
        raise ValueError(
            f"hardware.batch_threads={setting} splits fp32 micro-batches over CPU threads in one "
            f"process; it cannot apply here ({'; '.join(reasons)}). Use auto or 1."
        )
    return setting


def split_rows(batch: dict[str, torch.Tensor], shares: int) -> list[dict[str, torch.Tensor]]:
    """Cut a collated micro-batch into at most `shares` sub-batches of whole rows with about equal
    tokens (longest row first onto the lightest share), each cut to its own longest row.

    Per-row tensors ([rows, T]) are split; per-batch scalars (`attn_sq`, `packed`) are kept.
    """
    lengths = [int(n) for n in batch["attention_mask"].sum(dim=1)]
    shares = max(1, min(shares, len(lengths)))
    groups: list[list[int]] = [[] for _ in range(shares)]
    load = [0] * shares
    for r in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        g = min(range(shares), key=lambda g: (load[g], g))
        groups[g].append(r)
        load[g] += lengths[r]
    out = []
    for rows in groups:
        index = torch.tensor(sorted(rows))
        width = max(lengths[r] for r in rows)
        out.append(
            {
                k: v.index_select(0, index)[:, :width] if v.dim() == 2 else v
                for k, v in batch.items()
            }
        )
    return out


class RowThreads:
    """A pool of `n` threads that run work with one intra-op thread each.

    While the pool works the calling thread only waits; torch's thread count (process-wide for
    MKL) is set to one for that time and restored after, so the optimizer step and validation
    keep every core.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.n,
                thread_name_prefix="arenaflow-rows",
                initializer=torch.set_num_threads,
                initargs=(1,),
            )
        grad = torch.is_grad_enabled()  # grad mode is per thread

        def call(item: Any) -> T:
            with torch.set_grad_enabled(grad):
                return fn(item)

        outer = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return list(self._pool.map(call, items))
        finally:
            torch.set_num_threads(outer)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def add_grads(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    """Accumulate a share's gradients into `.grad` (the layout autograd would leave)."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
