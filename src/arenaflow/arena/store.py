"""The durable store of Chatbot Arena votes: one row per battle, FastChat's battle fields.

The arena page writes votes here and the rating stage reads them back as battles. Any SQLAlchemy
URL works (a shared PostgreSQL for several servers); the default is a SQLite file, opened in WAL
mode with a long busy timeout so that concurrent writers (threads or processes) wait for the lock
instead of failing, and the unique `battle_id` makes a second vote on the same battle a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

log = logging.getLogger(__name__)

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
BUSY_TIMEOUT_MS = 60_000

_metadata = sa.MetaData()
votes = sa.Table(
    "arena_votes",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("battle_id", sa.String(128), nullable=False, unique=True),
    sa.Column("model_a", sa.String(256), nullable=False),
    sa.Column("model_b", sa.String(256), nullable=False),
    sa.Column("winner", sa.String(16), nullable=False),
    sa.Column("anony", sa.Boolean, nullable=False),
    sa.Column("tstamp", sa.Float, nullable=False, index=True),
    sa.Column("turn", sa.Integer, nullable=False),
    sa.Column("language", sa.String(16), nullable=True),
    sa.Column("conversation_a", sa.JSON, nullable=False),
    sa.Column("conversation_b", sa.JSON, nullable=False),
    sa.Column("client_id", sa.String(256), nullable=False),
)


def default_db_url(home: str | Path) -> str:
    return f"sqlite:///{Path(home) / 'arena' / 'votes.db'}"


def vote_db_url(cfg: Any) -> str:
    """`serve.arena.db_url`, else the default SQLite file under `paths.home`."""
    serve = cfg.get("serve") if hasattr(cfg, "get") else None
    arena = serve.get("arena") if serve is not None else None
    url = arena.get("db_url") if arena is not None else None
    return str(url) if url else default_db_url(cfg.paths.home)


def database_exists(url: str) -> bool:
    """False only for a SQLite file that is not there (opening it would create an empty one)."""
    u = sa.engine.make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return True
    return Path(u.database).expanduser().is_file()


def safe_url(url: str) -> str:
    """The URL with its password hidden, for logs and metadata (the one redaction, `arenaflow.redact`)."""
    from arenaflow.redact import redact

    return redact(url)


def count_turns(conversation: list[dict]) -> int:
    """Turns = user messages (FastChat's `turn`: the number of prompts in the battle)."""
    return sum(1 for m in conversation if m.get("role") == "user")


def detect_language(conversation: list[dict], max_chars: int = 2000) -> str | None:
    """The language of the user's prompts (langid), as FastChat's battles record it."""
    text = "\n".join(str(m.get("content") or "") for m in conversation if m.get("role") == "user")[
        :max_chars
    ]
    if not text.strip():
        return None
    try:
        import langid
    except ImportError:  # pragma: no cover - langid is a runtime dependency
        return None
    return langid.classify(text)[0]


class VoteStore:
    """Arena votes in a SQL database (tables created on first use)."""

    def __init__(self, url: str) -> None:
        self.url = sa.engine.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            database = self.url.database
            if database in (None, "", ":memory:") or str(database).startswith("file::memory:"):
                # One shared connection, or each thread would see its own empty database.
                kwargs = {
                    "poolclass": sa.pool.StaticPool,
                    "connect_args": {"check_same_thread": False},
                }
            else:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
                kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_MS / 1000}}
        self.engine = sa.create_engine(self.url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_lock = threading.Lock()
        self._create_tables()

    def _create_tables(self) -> None:
        # Several processes may start at once on a fresh file: creating the table races, and the
        # loser's CREATE fails with "already exists"; a retry sees the table and does nothing.
        with self._create_lock:
            for attempt in range(5):
                try:
                    _metadata.create_all(self.engine)
                    return
                except sa.exc.OperationalError:
                    if attempt == 4:
                        raise
                    time.sleep(0.05 * (attempt + 1))

    @classmethod
    def from_cfg(cls, cfg: Any) -> VoteStore:
        """The store at `serve.arena.db_url`; default a SQLite file under `paths.home`."""
        return cls(vote_db_url(cfg))

    def record_vote(
        self,
        *,
        battle_id: str,
        model_a: str,
        model_b: str,
        winner: str,
        anony: bool,
        conversation_a: list[dict],
        conversation_b: list[dict],
        client_id: str,
        tstamp: float | None = None,
        language: str | None = None,
    ) -> bool:
        """Store one vote; False (nothing written) when `battle_id` already has one."""
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {list(WINNERS)}, got {winner!r}")
        if not battle_id:
            raise ValueError("battle_id must be a non-empty string")
        if not model_a or not model_b:
            raise ValueError("model_a and model_b must be non-empty model names")
        if model_a == model_b:
            raise ValueError(f"a battle needs two different models, got {model_a!r} on both sides")
        for side, conv in (("conversation_a", conversation_a), ("conversation_b", conversation_b)):
            if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
                raise ValueError(f"{side} must be a list of OpenAI-style message dicts")
        row = {
            "battle_id": str(battle_id),
            "model_a": str(model_a),
            "model_b": str(model_b),
            "winner": winner,
            "anony": bool(anony),
            "tstamp": float(time.time() if tstamp is None else tstamp),
            "turn": count_turns(conversation_a),
            "language": language if language is not None else detect_language(conversation_a),
            "conversation_a": conversation_a,
            "conversation_b": conversation_b,
            "client_id": str(client_id),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(votes.insert().values(**row))
        except IntegrityError:
            log.info("battle %s already has a vote; ignored", battle_id)
            return False
        return True

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(votes)).scalar_one())

    def has_vote(self, battle_id: str) -> bool:
        with self.engine.connect() as conn:
            query = sa.select(votes.c.id).where(votes.c.battle_id == str(battle_id))
            return conn.execute(query).first() is not None

    def battles(self, since: float | None = None) -> list[dict]:
        """Votes as FastChat battle dicts (newer than `since` when given), oldest first."""
        query = sa.select(votes).order_by(votes.c.tstamp, votes.c.id)
        if since is not None:
            query = query.where(votes.c.tstamp > float(since))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_battle(r) for r in rows]

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"VoteStore({safe_url(self.url)!r})"


def _battle(row: Any) -> dict:
    return {
        "question_id": row["battle_id"],
        "battle_id": row["battle_id"],
        "model_a": row["model_a"],
        "model_b": row["model_b"],
        "winner": row["winner"],
        "judge": f"arena_user_{row['client_id']}",
        "client_id": row["client_id"],
        "anony": bool(row["anony"]),
        "tstamp": float(row["tstamp"]),
        "turn": int(row["turn"]),
        "language": row["language"],
        "conversation_a": row["conversation_a"],
        "conversation_b": row["conversation_b"],
    }


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()
