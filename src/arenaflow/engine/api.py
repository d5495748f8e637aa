"""The generation engine's data types: the contract between the engine and its users.

MT-bench answer generation, the local judge and the HTTP server all speak these types, so a
request means the same thing everywhere (greedy at temperature 0, stop strings, n, logprobs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from arenaflow.engine.constraints import Constraint

# Below this a temperature is greedy decoding: logits / 1e-40 overflow to inf and the softmax turns
# to NaN, and long before that the distribution is one-hot in float32 anyway.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # generation ends before the first stop string
    seed: int | None = None  # same seed + same request => same sample
    n: int = 1  # independent choices per request
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20 alternatives per generated token
    constraint: Constraint | None = None  # a JSON schema / grammar every choice's output obeys
    # OpenAI's penalties over the tokens this choice generated, vLLM's over prompt and output, and
    # OpenAI's logit_bias (token id -> added logit); engine/penalties.py applies them
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the bad field (callers turn it into a 400); a temperature
        below MIN_TEMPERATURE becomes 0 (greedy), so no request can overflow the sampler."""
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        self._validate_penalties()
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(
                f"constraint must be a Constraint, got {type(self.constraint).__name__}"
            )

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token_id!r}")
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")

    @property
    def penalized(self) -> bool:
        """Whether any penalty or bias changes the logits (most requests: no work per step)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )


@dataclass
class TopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop string or the constraint's end) | "length"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int  # summed over choices


@dataclass
class StreamEvent:
    """One increment of a streamed request: new text for one choice, or its end."""

    index: int  # choice index
    text: (
        str  # newly decoded text (may be "" while a multi-byte character or stop string is pending)
    )
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # set on the choice's last event
    prompt_tokens: int | None = None  # set on the last event of the request
    completion_tokens: int | None = None


class RequestFailedError(Exception):
    """One request failed inside the running batch (its prefill, its sampler or its own callback
    raised); the rows it shared the batch with went on (the server answers 500)."""


class QueueFullError(RuntimeError):
    """The scheduler's queue is full (the server answers 429 with Retry-After)."""


class PromptTooLongError(ValueError):
    """prompt tokens + max_new_tokens exceed the model's context window (the server answers 400)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        self.prompt_tokens, self.max_new_tokens, self.context_length = (
            prompt_tokens,
            max_new_tokens,
            context_length,
        )
        super().__init__(
            f"this model's context window is {context_length} tokens; the prompt has {prompt_tokens} "
            f"tokens and {max_new_tokens} more were requested for the completion"
        )
