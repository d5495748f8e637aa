"""Text rules shared by the data cleaning and the arena: the blocked-word check.

One rule for both, so a prompt the arena refuses is one the cleaning would have dropped
(`data.blocked_words`, case-insensitive substrings).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache


class BlockedWords:
    """Case-insensitive substring search for a few words (lower() + `in` beats an re.I regex)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(w.lower() for w in words)

    def search(self, text: str) -> bool:
        if not self.words:
            return False
        low = text.lower()
        return any(w in low for w in self.words)


@lru_cache(maxsize=64)
def blocked_words(words: tuple[str, ...]) -> BlockedWords:
    return BlockedWords(words)


def contains_blocked_word(text: str, words: Sequence[str]) -> bool:
    return blocked_words(tuple(words)).search(text)
