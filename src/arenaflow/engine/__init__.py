"""One generation engine for MT-bench answers, the local judge and the HTTP server.

`Engine` runs a Hugging Face causal LM with its own continuous-batching decode loop; `Scheduler`
puts an asyncio front on it so concurrent requests share decode steps.
"""

from arenaflow.engine.api import (
    Choice,
    GenerationResult,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
    SamplingParams,
    StreamEvent,
    TokenLogprob,
    TopLogprob,
)
from arenaflow.engine.constraints import Constraint, InvalidConstraintError
from arenaflow.engine.engine import Engine, resolve_checkpoint
from arenaflow.engine.scheduler import Scheduler

__all__ = [
    "Choice",
    "Constraint",
    "Engine",
    "GenerationResult",
    "InvalidConstraintError",
    "PromptTooLongError",
    "QueueFullError",
    "RequestFailedError",
    "SamplingParams",
    "Scheduler",
    "StreamEvent",
    "TokenLogprob",
    "TopLogprob",
    "resolve_checkpoint",
]
