"""What every paid model call passes before it is sent: a budget gate (`CallGate`).

`reserve` holds one call and an upper bound on its tokens (None when granted, else the reason it
is refused); `settle` replaces the held tokens with what the call really used. The judge runner
implements it over `judge.max_calls` / `judge.max_tokens_budget`; `NO_BUDGET` lets everything by.
"""

from __future__ import annotations

from typing import Protocol


class CallGate(Protocol):
    def reserve(self, tokens: int, *, wait: bool = True) -> str | None: ...

    def settle(self, reserved: int, used: int) -> None: ...


class _Unlimited:
    def reserve(self, tokens: int, *, wait: bool = True) -> str | None:
        return None

    def settle(self, reserved: int, used: int) -> None: ...


NO_BUDGET: CallGate = _Unlimited()


class BudgetRefusedError(RuntimeError):
    """The budget refused the next request; `attempts` were already sent for this item."""

    def __init__(self, reason: str, attempts: int) -> None:
        super().__init__(reason)
        self.reason, self.attempts = reason, attempts


def call_token_bound(messages: list[dict[str, str]], max_tokens: int) -> int:
    """The most one call can cost: a token is at least one UTF-8 byte of the prompt, plus the
    chat format's few tokens per message, plus the most the reply may use."""
    return sum(len(m["content"].encode()) + 4 for m in messages) + 3 + max_tokens
