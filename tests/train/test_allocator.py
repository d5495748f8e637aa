"""hardware.retain_freed_memory: a step's large buffers stop page-faulting after the first step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from arenaflow.train.allocator import glibc, retain_enabled

# Run in a child process: the allocator settings are process-wide. Allocates and touches a
# 256 MiB tensor, frees it, then a 192 MiB one (as the next training step would, with other
# lengths) and counts the page faults of the second. (Smaller, because whatever small object
# lands in the freed block first would keep a same-size block from fitting there.)
CHILD = r"""
import json, resource, sys, threading, torch
from arenaflow.train.allocator import retained_heap

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def allocation_faults():
    faults = []
    for mib in (256, 192):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(mib * 2**18)  # float32
        t.fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

def second_allocation_faults():
    return allocation_faults()[1]

def in_a_new_thread():
    out = []
    worker = threading.Thread(target=lambda: out.append(second_allocation_faults()))
    worker.start()
    worker.join()
    return out[0]

start = resident_mib()
with retained_heap(sys.argv[1] == "on") as active:
    inside = second_allocation_faults()
    thread = in_a_new_thread()  # a thread's own arena would mmap blocks over 64 MiB
    kept = resident_mib() - start  # freed blocks still resident while the heap is retained
given_back = resident_mib() - start  # on exit the free heap is trimmed
# settings restored: the first large block after the exit faults its pages in afresh (the second
# may reuse the first's freed block if a small object landed above it, as with glibc's defaults)
after = allocation_faults()[0]
print(json.dumps({"active": active, "inside": inside, "thread": thread, "after": after,
                  "kept": kept, "given_back": given_back}))
"""


def _child(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc() is None, reason="mallopt thresholds are a glibc feature")
def test_retained_heap_reuses_freed_memory_and_restores_glibc_defaults() -> None:
    default = _child("off")
    retained = _child("on")
    assert default["active"] is False and retained["active"] is True
    # 192 MiB in 4 KiB pages is 49152 pages: glibc's default maps and faults them in every time
    assert default["inside"] > 10_000
    assert retained["inside"] < default["inside"] / 20  # reused from the heap: no new pages
    # other threads (OpenMP workers, row threads) reuse the main heap's blocks as well
    assert default["thread"] > 10_000
    assert retained["thread"] < default["thread"] / 20
    # the retained heap keeps its peak resident; leaving the block gives that memory back
    assert retained["kept"] > 128 and default["kept"] < 64
    assert retained["given_back"] < 64
    # ... and the next large block faults its pages in afresh (256 MiB: 65536 pages)
    assert retained["after"] > 30_000 and default["after"] > 30_000


def test_retain_setting_is_a_bool_and_acts_on_cpu_only() -> None:
    assert retain_enabled(True, "cpu") is True
    assert retain_enabled(True, "gpu") is False
    assert retain_enabled(False, "cpu") is False
    with pytest.raises(ValueError, match="must be true or false, not 'maybe'"):
        retain_enabled("maybe", "cpu")
