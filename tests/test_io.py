"""Atomic writes: a write killed half-way leaves the previous version (or nothing), never half a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from arenaflow import io

WRITER = """
import sys, time
from pathlib import Path
from arenaflow import io

target, ready = sys.argv[1], Path(sys.argv[2])

def rows():
    for i in range(20_000):  # ~2 MB: far past any write buffer, so the old code left it on disk
        yield {"i": i, "pad": "x" * 100}
    ready.touch()
    time.sleep(600)  # killed here, with every row written but the file not finished

io.write_jsonl(target, rows())
"""


def kill_mid_write(tmp_path, target) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the writer exited before it was killed"
            assert time.monotonic() < deadline, "the writer never got half-way"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_write_jsonl_keeps_the_previous_version(tmp_path):
    target = tmp_path / "out" / "rows.jsonl"
    io.write_jsonl(str(target), [{"i": -1}, {"i": -2}])
    before = target.read_bytes()
    kill_mid_write(tmp_path, target)
    assert target.read_bytes() == before
    assert [r["i"] for r in io.read_jsonl(str(target))] == [-1, -2]


def test_a_killed_first_write_leaves_no_file(tmp_path):
    target = tmp_path / "rows.jsonl"
    kill_mid_write(tmp_path, target)
    assert not target.exists()


def test_an_error_mid_write_keeps_the_target_and_removes_the_temporary(tmp_path):
    target = tmp_path / "rows.jsonl"
    io.write_jsonl(str(target), [{"ok": True}])

    def rows():
        yield {"ok": False}
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        io.write_jsonl(str(target), rows())
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_remote_filesystems_write_through_a_temporary_and_move():
    uri = "memory://test_io/run/report.json"
    io.write_json(uri, {"a": 1})
    io.write_json(uri, {"a": 2})
    assert io.read_json(uri) == {"a": 2}
    assert fsspec.filesystem("memory").ls("/test_io/run", detail=False) == [
        "/test_io/run/report.json"
    ]
