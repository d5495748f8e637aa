"""Text bookkeeping for one generated sequence: stop strings and what is safe to stream yet.

A stop string may arrive split across tokens and a multi-byte character may need two tokens, so
the streamed text holds back any tail that could still turn into either.
"""

from __future__ import annotations


def find_stop(text: str, stops: list[str], search_from: int = 0) -> int:
    """Index of the earliest stop string in `text` at or after `search_from`, or -1."""
    best = -1
    for s in stops:
        if not s:
            continue
        i = text.find(s, search_from)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def stream_safe_end(text: str, stops: list[str]) -> int:
    """How much of an unfinished sequence's text can be streamed without risk of retraction."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
        end -= 1
    held = 0
    for s in stops:  # the longest tail of the text that a stop string starts with
        for k in range(min(len(s) - 1, end), held, -1):
            if text.endswith(s[:k], 0, end):
                held = k
                break
    return end - held
