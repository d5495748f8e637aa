"""The vLLM backend for batch generation on a GPU: vLLM's offline `LLM` behind `Engine`'s interface.

MT-bench answers and the local judge hand whole lists of requests to `run_requests`, which is what
the offline `LLM.generate` is for; the prompts are still rendered and tokenized by the checkpoint's
HF tokenizer, so vLLM decodes the same token ids as every other backend. Serving runs `vllm serve`
as an engine process behind the gateway (serve/upstream.py), so this engine has no running batch:
`stream` / `new_batch` raise ValueError, as does a request asking for what it does not map
(constraints).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from arenaflow.engine.api import SamplingParams, TokenLogprob, TopLogprob
from arenaflow.engine.batch import Request
from arenaflow.engine.engine import Engine, resolve_checkpoint

log = logging.getLogger(__name__)


class VllmEngine(Engine):
    """An `Engine` whose `run_requests` is one `vllm.LLM.generate` call."""

    def __init__(self, llm: Any, tokenizer: Any, *, model_id: str, context_length: int) -> None:
        self.model = llm
        self.adapter = None
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch_size = 256  # vLLM schedules its own batch
        self.context_length = context_length
        self.eos_ids = (
            {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        )
        self.constraints = None
        self.lock = threading.Lock()

    @classmethod
    def load(  # type: ignore[override]
        cls, model: str | Path, *, dtype: str = "bfloat16", tracking_uri: str | None = None
    ) -> VllmEngine:
        from vllm import LLM

        from arenaflow.models import load_tokenizer

        path = resolve_checkpoint(model, tracking_uri)
        tokenizer = load_tokenizer(path)
        llm = LLM(model=str(path), dtype=dtype)
        length = int(llm.llm_engine.model_config.max_model_len)
        log.info("engine loaded %s on vLLM (%s) from %s", model, dtype, path)
        return cls(llm, tokenizer, model_id=str(model), context_length=length)

    def make_request(self, prompt: str, params: SamplingParams, **callbacks: Any) -> Request:
        if params.constraint is not None:
            raise ValueError("the vllm backend takes no constraint here; use engine.backend=hf")
        return super().make_request(prompt, params, **callbacks)

    def with_adapter(self, adapter: str, tokenizer: Any, *, model_id: str) -> Engine:
        raise ValueError("the vllm backend serves no adapters here; use engine.backend=hf")

    def next_token_logprobs(self, prompt_ids: list[int]) -> Any:
        raise NotImplementedError(
            "vLLM returns the top-k alternatives only, not the whole next-token distribution; "
            "the judge keeps the verdicts the top-20 logprobs of its replies give"
        )

    def new_batch(self) -> Any:
        raise ValueError(
            "the vllm backend generates whole batches only; serve with `vllm serve` as an engine "
            "process (serve.models entries with an upstream) or use engine.backend=hf"
        )

    def stream(self, prompt: str, params: SamplingParams) -> Any:
        return self.new_batch()

    def run_requests(self, requests: list[Request]) -> None:
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        params = [
            VllmParams(
                n=r.params.n,
                temperature=r.params.temperature,
                top_p=r.params.top_p,
                max_tokens=r.params.max_new_tokens,
                stop=list(r.params.stop) or None,
                seed=r.params.seed,
                logprobs=r.params.top_logprobs if r.params.logprobs else None,
            )
            for r in requests
        ]
        with self.lock:
            outputs = self.model.generate(prompts, params, use_tqdm=False)
        for r, out in zip(requests, outputs, strict=True):
            for seq, comp in zip(r.seqs, out.outputs, strict=True):
                seq.token_ids = [t for t in comp.token_ids if t not in self.eos_ids]
                seq.text = comp.text
                seq.generated = len(comp.token_ids)
                seq.finish_reason = "length" if comp.finish_reason == "length" else "stop"
                if seq.logprobs is not None and comp.logprobs:
                    k = r.params.top_logprobs
                    seq.logprobs = [
                        _logprob(t, lp, k)
                        for t, lp in zip(comp.token_ids, comp.logprobs, strict=True)
                    ]


def _logprob(token_id: int, alternatives: dict[int, Any], k: int) -> TokenLogprob:
    """vLLM's per-token dict (the top k and the sampled token, each with its rank) as ours."""
    chosen = alternatives[token_id]
    ranked = sorted(alternatives.items(), key=lambda kv: kv[1].rank or 0)[:k]
    top = [TopLogprob(a.decoded_token or "", int(t), float(a.logprob)) for t, a in ranked]
    return TokenLogprob(chosen.decoded_token or "", token_id, float(chosen.logprob), top)
