"""A persistent judgment cache: a re-run, or a resume after a crash, never pays twice for a verdict.

Entries live in SQLite, keyed by a hash of everything that decides a judgment (judge model and
sampling settings, prompt name and text, reference answer, question, turn, answers, order). Every
reply the judge returned is stored with its raw text the moment it returns, a reply without a
readable verdict too: a rerun re-reads it instead of paying again. Failed calls are not stored,
so they are retried next time.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


def judgment_key(**parts: Any) -> str:
    """A stable hash of the parts of a judgment request (order of keyword arguments is irrelevant)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgmentCache:
    """SQLite-backed map from judgment key to the stored reply and verdict; safe across threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # WAL and a busy timeout: two judge runs on one cache wait for each other's writes
        # instead of failing with "database is locked"
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=60000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgments ("
            "key TEXT PRIMARY KEY, judge_model TEXT, value TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, judge_model: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments (key, judge_model, value, created) "
                "VALUES (?, ?, ?, ?)",
                (key, judge_model, json.dumps(value, ensure_ascii=False), time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
