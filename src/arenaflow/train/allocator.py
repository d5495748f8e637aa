"""glibc malloc settings for training on CPU (`hardware.retain_freed_memory`).

PyTorch's CPU allocator has no cache: every tensor is a malloc and every free a free. glibc serves
blocks above its mmap threshold (128 KiB at start, adjusted upward to at most 32 MiB) with fresh
mmap'd pages and unmaps them again on free, and it hands the free top of the heap back to the
kernel past its trim threshold. A training step allocates the same large buffers every time
(logits over the vocabulary, attention and MLP activations, gradients), so with the defaults each
step pays page faults and kernel zero-filling for all of them again. Raising both thresholds keeps
freed blocks in the heap for the next step; the process keeps its peak resident memory instead of
returning it between steps (the memory preflight already budgets for that peak).

Threads other than the main one (OpenMP's intra-op workers, `rows.RowThreads`) would each get an
arena of their own, whose heaps glibc caps at 64 MiB: anything larger is mmap'd and unmapped on
free whatever the thresholds say. So while the heap is retained, every thread allocates from the
one main arena (`M_ARENA_MAX=1`); the few large allocations a step makes hardly contend for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
GLIBC_START_THRESHOLD = 128 * 1024  # both thresholds' values when a process starts
RETAIN_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it honours these mallopt parameters), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl has no such symbol)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def retain_enabled(setting: object, accelerator: str) -> bool:
    """`hardware.retain_freed_memory`: true or false; it acts on CPU runs only."""
    if not isinstance(setting, bool):
        raise ValueError(f"hardware.retain_freed_memory must be true or false, not {setting!r}")
    return setting and accelerator == "cpu"


def _set_thresholds(libc: ctypes.CDLL, value: int) -> bool:
    return bool(libc.mallopt(M_MMAP_THRESHOLD, value)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, value)
    )


def default_arena_max() -> int:
    """glibc's own limit on 64-bit: 8 arenas per core."""
    return 8 * (os.cpu_count() or 1)


@contextmanager
def retained_heap(enabled: bool = True) -> Iterator[bool]:
    """Keep freed memory in the heap while the block runs; yields whether that is in effect.

    On exit both thresholds go back to glibc's starting values (without the upward adjusting
    glibc would have done on its own) and the free heap is trimmed, so what runs afterwards in the
    same process (a benchmark's next recipe) maps and unmaps its large blocks again.
    """
    libc = glibc() if enabled else None
    active = (
        libc is not None
        and _set_thresholds(libc, RETAIN_THRESHOLD)
        and bool(libc.mallopt(M_ARENA_MAX, 1))
    )
    if enabled and not active:
        log.info("retain_freed_memory: the C library is not glibc; allocator left as it is")
    try:
        yield active
    finally:
        if active:
            _set_thresholds(libc, GLIBC_START_THRESHOLD)
            libc.mallopt(M_ARENA_MAX, default_arena_max())
            libc.malloc_trim(0)
