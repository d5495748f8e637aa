"""Chatbot Arena: the durable store of human votes that the arena page writes and the rating stage reads."""

from arenaflow.arena.store import WINNERS, VoteStore, default_db_url

__all__ = ["WINNERS", "VoteStore", "default_db_url"]
