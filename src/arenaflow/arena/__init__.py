"""Chatbot Arena: the battle page and its API (`routes.py`, mounted by the server; its guards in
`limits.py`, its page in `static/`) and the durable store of human votes (`store.py`) that the
page writes and the rating stage reads. Importing the package loads the store only."""

from arenaflow.arena.store import (
    WINNERS,
    VoteStore,
    database_exists,
    default_db_url,
    safe_url,
    vote_db_url,
)

__all__ = ["WINNERS", "VoteStore", "database_exists", "default_db_url", "safe_url", "vote_db_url"]
