"""Chatbot Arena: the durable store of human votes that the arena page writes and the rating stage reads."""

from arenaflow.arena.store import (
    WINNERS,
    VoteStore,
    database_exists,
    default_db_url,
    safe_url,
    vote_db_url,
)

__all__ = ["WINNERS", "VoteStore", "database_exists", "default_db_url", "safe_url", "vote_db_url"]
