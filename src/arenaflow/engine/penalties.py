"""Penalties and biases on one row's next-token logits, as the OpenAI API and vLLM define them.

- `repetition_penalty` (HF's and vLLM's extension): every token of the prompt or of the output so
  far has its logit divided by the penalty when positive, multiplied by it when negative.
- `frequency_penalty` and `presence_penalty` (OpenAI): a token the choice has generated c times
  loses `c * frequency_penalty + presence_penalty` from its logit (prompt tokens do not count,
  as in vLLM).
- `logit_bias` (OpenAI): the bias is added to that token's logit (-100 bans it, 100 forces it).

They change the logits before the schema's mask, the greedy choice, sampling and logprobs, so
the logprobs a request gets back describe the distribution its tokens were chosen from.
"""

from __future__ import annotations

import torch

from arenaflow.engine.api import SamplingParams


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError when a logit_bias key is not a token id of this vocabulary."""
    bad = [t for t in params.logit_bias if t >= vocab_size]
    if bad:
        raise ValueError(
            f"logit_bias names token id {bad[0]}, but this model's vocabulary has ids 0 to "
            f"{vocab_size - 1}"
        )


def apply_penalties(
    row: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> None:
    """Penalize and bias `row` (the logits of one choice's next token) in place; the request's
    logit_bias ids were checked against the vocabulary once, when it was made (`check_token_ids`)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt_ids, *output_ids}), dtype=torch.long)
        if seen.numel():
            v = row[seen]
            row[seen] = torch.where(
                v > 0, v / params.repetition_penalty, v * params.repetition_penalty
            )
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        ids, counts = torch.unique(torch.tensor(output_ids, dtype=torch.long), return_counts=True)
        cost = counts.to(row.dtype) * params.frequency_penalty + params.presence_penalty
        row.index_add_(0, ids, -cost)
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        row.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=row.dtype))
