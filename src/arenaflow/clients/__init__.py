"""The one model-client layer: every chat that leaves arenaflow (the judge, MT-bench competitors,
the terminal chat) goes through `EndpointClient` (any OpenAI-compatible endpoint: the official
`openai` client, tenacity retries with a capped Retry-After, a budget gate per attempt) or
`EngineClient` (the engine in process); which checkpoint a name means is answered once, by
`arenaflow.models.resolve_reference` / `local_checkpoint`."""

from arenaflow.clients.budget import NO_BUDGET, BudgetRefusedError, CallGate, call_token_bound
from arenaflow.clients.endpoint import (
    EndpointAuthError,
    EndpointClient,
    EndpointError,
    EndpointModelError,
    EndpointUnreachableError,
    UnreadableReplyError,
)
from arenaflow.clients.engine import EngineClient, Reply

__all__ = [
    "NO_BUDGET",
    "BudgetRefusedError",
    "CallGate",
    "EndpointAuthError",
    "EndpointClient",
    "EndpointError",
    "EndpointModelError",
    "EndpointUnreachableError",
    "EngineClient",
    "Reply",
    "UnreadableReplyError",
    "call_token_bound",
]
