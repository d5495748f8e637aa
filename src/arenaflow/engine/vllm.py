"""The vLLM backend for batch generation on a GPU: vLLM's offline `LLM` behind `Engine`'s interface.

MT-bench answers and the local judge hand whole lists of requests to `run_requests`, which is what
the offline `LLM.generate` is for; the prompts are still rendered and tokenized by the checkpoint's
HF tokenizer, so vLLM decodes the same token ids as every other backend. Serving runs `vllm serve`
as an engine process behind the gateway (serve/upstream.py), so this engine has no running batch:
`stream` / `new_batch` raise ValueError, as does a request asking for what it does not map
(constraints). An adapter checkpoint runs as its base with the adapter as vLLM's LoRA
(`enable_lora`, each request under its `LoRARequest`), the options `lora_options` sets, which
`vllm serve` gets as flags when adapters are served (serve/engine_process.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arenaflow.engine.api import SamplingParams, TokenLogprob, TopLogprob
from arenaflow.engine.batch import Request
from arenaflow.engine.engine import Engine, resolve_checkpoint

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts


def lora_options(adapters: Mapping[str, str | Path]) -> dict[str, Any]:
    """vLLM's LoRA options for these adapters (name -> adapter folder) over one base: every one
    loaded at once (`max_loras`, so their rows share batches) and `max_lora_rank` the smallest
    value vLLM accepts that holds the largest rank. ValueError for what vLLM's LoRA does not
    apply (DoRA, whole trained modules), naming the adapter and the fix."""
    from arenaflow.adapters import PEFT_CONFIG

    ranks = []
    for name, path in adapters.items():
        peft = json.loads((Path(path) / PEFT_CONFIG).read_text())
        for key, what in (("use_dora", "DoRA"), ("modules_to_save", "whole trained modules")):
            if peft.get(key):
                raise ValueError(
                    f"adapter {name} ({path}) has {what}, which vLLM's LoRA does not apply; "
                    "serve it merged (train.lora.merge=true) or in process (engine.backend=hf)"
                )
        ranks.append(max([int(peft["r"]), *map(int, (peft.get("rank_pattern") or {}).values())]))
    rank = next((r for r in VLLM_LORA_RANKS if r >= max(ranks)), None)
    if rank is None:
        raise ValueError(f"LoRA rank {max(ranks)} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": rank}


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
        self.lora_request: Any = None  # an adapter checkpoint's vllm.lora.request.LoRARequest

    @classmethod
    def load(  # type: ignore[override]
        cls, model: str | Path, *, dtype: str = "bfloat16", tracking_uri: str | None = None
    ) -> VllmEngine:
        """A checkpoint folder or registry URI; an adapter folder loads its base with the adapter
        as vLLM's LoRA, the prompts rendered by the adapter's own tokenizer files."""
        from vllm import LLM

        from arenaflow.adapters import base_folder, is_adapter, read_adapter
        from arenaflow.models import load_tokenizer

        path = resolve_checkpoint(model, tracking_uri)
        tokenizer = load_tokenizer(path)
        if is_adapter(path):
            base = base_folder(read_adapter(path), tracking_uri)
            llm = LLM(model=str(base), dtype=dtype, **lora_options({str(model): path}))
        else:
            llm = LLM(model=str(path), dtype=dtype)
        length = int(llm.llm_engine.model_config.max_model_len)
        engine = cls(llm, tokenizer, model_id=str(model), context_length=length)
        if is_adapter(path):
            from vllm.lora.request import LoRARequest

            engine.lora_request = LoRARequest(str(model), 1, str(path))
        log.info("engine loaded %s on vLLM (%s) from %s", model, dtype, path)
        return engine

    def make_request(self, prompt: str, params: SamplingParams, **callbacks: Any) -> Request:
        if params.constraint is not None:
            raise ValueError("the vllm backend takes no constraint here; use engine.backend=hf")
        if params.penalized and params.logprobs:  # ours describe the penalized distribution
            raise ValueError(
                "the vllm backend returns logprobs from before penalties and logit_bias; ask for "
                "one or the other, or use engine.backend=hf"
            )
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
                presence_penalty=r.params.presence_penalty,
                frequency_penalty=r.params.frequency_penalty,
                repetition_penalty=r.params.repetition_penalty,
                logit_bias=dict(r.params.logit_bias) or None,
            )
            for r in requests
        ]
        with self.lock:
            outputs = self.model.generate(
                prompts, params, use_tqdm=False, lora_request=self.lora_request
            )
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
