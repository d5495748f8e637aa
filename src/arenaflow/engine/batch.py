"""The running batch: a decode loop over a Hugging Face causal LM with one shared KV cache.

Why our own loop instead of `model.generate`: every row carries its own sampling settings (temperature,
top_p, seed, stop strings, logprobs), and new requests join between decode steps (continuous
batching). Newcomers are prefilled on their own and copied, left-padded, into the batch's
preallocated KV cache (`BatchKVCache`, written in place, never re-concatenated); finished rows are
dropped, so a long answer never holds up a short one. Position ids count only real tokens and the
attention mask hides the padding, so a padded row computes what it would compute alone.
"""

from __future__ import annotations

import inspect
import logging
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from arenaflow.adapters import BASE_ROW
from arenaflow.engine.api import (
    Choice,
    GenerationResult,
    RequestFailedError,
    SamplingParams,
    StreamEvent,
    TokenLogprob,
    TopLogprob,
)
from arenaflow.engine.constraints import Grammar, advance, mask_logits
from arenaflow.engine.kvcache import BatchKVCache
from arenaflow.engine.penalties import apply_penalties
from arenaflow.engine.text import find_stop, stream_safe_end

log = logging.getLogger(__name__)

_EMPTY = torch.empty(0, dtype=torch.long)


@dataclass
class Request:
    """One prompt with its settings; `n` choices become `n` rows of the batch."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[StreamEvent], None] | None = None
    on_done: Callable[[GenerationResult | BaseException], None] | None = None
    adapter: str | None = None  # the peft adapter its rows decode with (None: the base model)
    grammar: Grammar | None = None  # params.constraint, compiled
    seqs: list[Sequence] = field(default_factory=list)
    cancelled: bool = False
    result: GenerationResult | None = None
    error: RequestFailedError | None = None  # set when this request failed on its own

    def __post_init__(self) -> None:
        self.seqs = [Sequence(self, i) for i in range(self.params.n)]

    @property
    def done(self) -> bool:
        return self.error is not None or all(s.finish_reason is not None for s in self.seqs)

    def fail(self, error: BaseException) -> None:
        """Mark this request failed (first error wins); the batch drops its rows at the next check."""
        if self.error is None:
            log.error("generation request failed, its batch goes on: %r", error)
            self.error = RequestFailedError(f"generation failed: {type(error).__name__}: {error}")
            self.error.__cause__ = error

    def build_result(self) -> GenerationResult:
        choices = [
            Choice(
                index=s.index,
                text=s.text,
                token_ids=list(s.token_ids),
                finish_reason=s.finish_reason or "stop",
                logprobs=s.logprobs,
            )
            for s in self.seqs
        ]
        return GenerationResult(
            choices=choices,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=sum(s.generated for s in self.seqs),
        )


@dataclass
class Sequence:
    """One choice of a request: its generated tokens, text, logprobs and finish state."""

    request: Request
    index: int
    token_ids: list[int] = field(default_factory=list)
    generated: int = 0  # tokens sampled, eos included
    text: str = ""
    emitted: int = 0  # characters already streamed
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    generator: torch.Generator | None = None
    matcher: Any = None  # this choice's own grammar state, when the request is constrained

    def __post_init__(self) -> None:
        p = self.request.params
        if self.request.grammar is not None:
            self.matcher = self.request.grammar.matcher()
        if p.logprobs:
            self.logprobs = []
        if p.temperature > 0:
            seed = p.seed + self.index if p.seed is not None else random.randrange(2**62)
            self.generator = torch.Generator().manual_seed(seed)


class RunningBatch:
    """Rows being decoded together; `admit` adds rows (prefill), `step` decodes one token for all."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos_ids: set[int],
        context_length: int,
        max_batch_size: int = 16,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.device = next(model.parameters()).device
        self.rows: list[Sequence] = []
        self.cache: BatchKVCache | None = None
        self.positions = _EMPTY  # [rows] tokens cached per row = position of the next input token
        self.next_tokens = _EMPTY  # [rows] last sampled token, not yet in cache
        self.last_batch_size = 0
        self.steps = 0
        # rows of different adapters (and of the base) share the batch: peft's adapter_names per row
        self.peft = _is_peft(model)
        inner = model.get_base_model() if self.peft else model
        # transformers >= 5.2x names the cache argument `cache`; older releases `past_key_values`
        params = inspect.signature(inner.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def __len__(self) -> int:
        return len(self.rows)

    # -- admission -----------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, requests: list[Request]) -> list[Request]:
        """Prefill the requests' prompts and merge them into the batch; returns requests finished already.

        Each prompt is prefilled on its own (no padding, so no wasted compute and exactly the
        numbers an unbatched run computes); the n choices of a request share one prefill.
        """
        prefilled, ok = [], []
        for r in requests:  # a prompt the model cannot prefill fails alone
            try:
                prefilled.append(self._prefill(r.prompt_ids, r.adapter))
                ok.append(r)
            except Exception as e:
                r.fail(e)
        failed = [r for r in requests if r.error is not None]
        requests = ok
        seqs = [s for r in requests for s in r.seqs]
        if not seqs:
            return failed
        if self.cache is None:
            self.cache = BatchKVCache(
                len(prefilled[0][0].layers), self.max_batch_size, self.context_length
            )
        self.cache.add([c for c, _ in prefilled], [r.params.n for r in requests])
        logits = torch.cat(
            [last.expand(r.params.n, -1) for (_, last), r in zip(prefilled, requests, strict=True)]
        )
        lengths = torch.tensor([len(s.request.prompt_ids) for s in seqs], dtype=torch.long)
        self.positions = torch.cat([self.positions, lengths])
        self.rows.extend(seqs)
        self.next_tokens = torch.cat([self.next_tokens, self._sample(logits, seqs)])
        return failed + self._finish_rows()

    def _prefill(self, prompt_ids: list[int], adapter: str | None) -> tuple[Any, torch.Tensor]:
        """KV cache and last-position logits of one unpadded prompt."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=torch.tensor([prompt_ids], dtype=torch.long, device=self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: cache},
            **self._adapter_names([adapter]),
        )
        return cache, out.logits[:, -1, :].float().cpu()

    # -- decoding ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Decode one token for every row; returns the requests that finished in this step."""
        if not self.rows:
            return []
        self.cache.reserve(1)
        width = self.cache.width + 1  # columns attended to, this step's token included
        mask = torch.arange(width) >= (width - 1 - self.positions)[:, None]  # left padding
        out = self.model(
            input_ids=self.next_tokens[:, None].to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=self.positions[:, None].to(self.device),
            use_cache=True,
            **{self.cache_kwarg: self.cache},
            **self._adapter_names([s.request.adapter for s in self.rows]),
        )
        self.cache.advance(1)
        self.positions = self.positions + 1
        self.last_batch_size = len(self.rows)
        self.steps += 1
        self.next_tokens = self._sample(out.logits[:, -1, :].float().cpu(), self.rows)
        return self._finish_rows()

    def _adapter_names(self, adapters: list[str | None]) -> dict[str, Any]:
        """The forward's per-row adapters on a peft model (nothing for a plain one)."""
        return {"adapter_names": [a or BASE_ROW for a in adapters]} if self.peft else {}

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next token of every row; a row whose sampling or bookkeeping raises fails its request
        only (its batch-mates get their tokens as usual)."""
        logits = torch.nan_to_num(logits, nan=-torch.inf)  # a NaN never wins, never breaks softmax
        for i, s in enumerate(seqs):
            if s.request.params.penalized and s.request.error is None:
                try:
                    apply_penalties(logits[i], s.request.params, s.request.prompt_ids, s.token_ids)
                except Exception as e:
                    s.request.fail(e)
        constrained = [
            (i, s.matcher)
            for i, s in enumerate(seqs)
            if s.matcher is not None and s.request.error is None
        ]
        mask_logits(logits, constrained)  # before greedy, sampling and logprobs alike
        need_logprobs = any(s.request.params.logprobs for s in seqs)
        logp = torch.log_softmax(logits, dim=-1) if need_logprobs else None
        chosen = logits.argmax(dim=-1)
        for i, s in enumerate(seqs):
            if s.request.error is not None:
                continue
            p = s.request.params
            try:
                if p.temperature > 0:
                    chosen[i] = _sample_row(logits[i], p.temperature, p.top_p, s.generator)
                lp = None
                if p.logprobs:
                    lp = self._token_logprob(logp[i], int(chosen[i]), p.top_logprobs)
                self._append(s, int(chosen[i]), lp)
            except Exception as e:
                s.request.fail(e)
        return chosen

    def _token_logprob(self, row: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
        top: list[TopLogprob] = []
        if k > 0:
            vals, idx = row.topk(k)
            top = [
                TopLogprob(self.tokenizer.decode([int(t)]), int(t), float(v))
                for v, t in zip(vals, idx, strict=True)
            ]
        return TokenLogprob(self.tokenizer.decode([token_id]), token_id, float(row[token_id]), top)

    def _append(self, s: Sequence, token_id: int, lp: TokenLogprob | None) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        if s.finish_reason is not None:
            return
        p = s.request.params
        s.generated += 1
        if s.logprobs is not None and lp is not None:
            s.logprobs.append(lp)
        finish = None
        ended = s.matcher is not None and advance(s.matcher, token_id)
        if token_id in self.eos_ids:
            finish = "stop"
        else:
            s.token_ids.append(token_id)
            before = len(s.text)
            s.text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            longest = max((len(x) for x in p.stop), default=0)
            cut = find_stop(s.text, p.stop, max(0, before - longest))
            if cut != -1:
                s.text = s.text[:cut]
                finish = "stop"
            elif ended:  # the grammar is complete: nothing but eos could follow
                finish = "stop"
        if finish is None and (
            s.generated >= p.max_new_tokens
            or len(s.request.prompt_ids) + s.generated >= self.context_length
        ):
            finish = "length"
        s.finish_reason = finish
        self._emit(s, token_id, lp)

    def _emit(self, s: Sequence, token_id: int, lp: TokenLogprob | None) -> None:
        req = s.request
        if req.on_event is None:
            return
        end = len(s.text) if s.finish_reason else stream_safe_end(s.text, req.params.stop)
        delta = s.text[s.emitted : end] if end > s.emitted else ""
        s.emitted = max(s.emitted, end)
        event = StreamEvent(
            index=s.index, text=delta, token_id=token_id, logprob=lp, finish_reason=s.finish_reason
        )
        if s.finish_reason and req.done:
            event.prompt_tokens = len(req.prompt_ids)
            event.completion_tokens = sum(x.generated for x in req.seqs)
        req.on_event(event)

    def _finish_rows(self) -> list[Request]:
        """Drop finished or cancelled rows from the batch and return the requests now complete."""
        keep = [
            i
            for i, s in enumerate(self.rows)
            if s.finish_reason is None and not s.request.cancelled and s.request.error is None
        ]
        finished: list[Request] = []
        seen: set[int] = set()
        for i, s in enumerate(self.rows):
            if i in keep or id(s.request) in seen:
                continue
            if s.request.cancelled or s.request.done:
                seen.add(id(s.request))
                finished.append(s.request)
        if len(keep) == len(self.rows):
            return []
        self._keep_rows(keep)
        return finished

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows at indices `keep`: their positions, next tokens and cache (the
        model-side part of dropping rows; another backend's batch replaces it)."""
        idx = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.positions = self.positions[idx]
        self.next_tokens = self.next_tokens[idx]
        if not self.rows:
            self.cache = None
            return
        lead = self.cache.width - int(self.positions.max())  # columns that are padding in all rows
        self.cache.keep(keep, lead)

    def cancel_all(self, error: BaseException) -> list[Request]:
        """Abort every row (after a model error); returns the affected requests."""
        reqs = list({id(s.request): s.request for s in self.rows}.values())
        self.rows, self.cache, self.positions, self.next_tokens = [], None, _EMPTY, _EMPTY
        log.error("generation batch failed, %d request(s) aborted: %s", len(reqs), error)
        return reqs


def _is_peft(model: Any) -> bool:
    peft = sys.modules.get("peft")  # a model can only be peft's once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def _sample_row(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token from softmax(logits / temperature) cut to the top_p nucleus.

    Raises ValueError when the row has no finite logit (nothing to sample from)."""
    if not torch.isfinite(logits).any():
        raise ValueError("the model produced no finite logit for this row")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        sorted_p[(cum - sorted_p) > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0.0:
        return logits.argmax()  # a degenerate distribution is greedy
    return torch.multinomial(probs, 1, generator=generator)[0]
