"""The local judge: the arenaflow engine in process, batched greedy judging within the budget
(a structured verdict decoded under its schema's grammar), and the verdict token's distribution
read after a forced `[[` prefix; which checkpoint and engine it runs (`judge.model`,
`judge.kv_cache`), and their identity in the judgment cache's keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from arenaflow.clients.budget import NO_BUDGET, CallGate
from arenaflow.judge.backends import (
    VERDICT_PREFIX,
    ChatRequest,
    Completion,
    JudgeBackend,
    JudgeConfigError,
    OnResult,
    Recovery,
)
from arenaflow.judge.verdicts import PAIR_TOKENS, RATING_TOKENS

if TYPE_CHECKING:
    from arenaflow.engine import SamplingParams
    from arenaflow.engine.backends import EngineSpec


class LocalBackend(JudgeBackend):
    """The arenaflow engine in process: batched greedy judging, and the verdict token's
    distribution read after a forced `[[` prefix appended to the judge's own reply."""

    supports_logprobs = True

    def __init__(
        self,
        engine: Any,
        *,
        model_name: str,
        temperature: float = 0.0,
        max_tokens: int = 512,
        batch_size: int = 8,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.temperature, self.max_tokens = temperature, max_tokens
        self.batch_size = max(1, batch_size)

    def _fits(self, prompt: str, new_tokens: int) -> int | None:
        n = len(self.engine.encode(prompt))
        return n if n + new_tokens <= self.engine.context_length else None

    def _admit(self, costs: dict[int, int], gate: CallGate) -> tuple[list[int], str | None]:
        """The requests (in order) the budget lets into the next batch, and the reason it
        refused the rest; requests that only wait for this batch's tokens go in a later one."""
        granted: list[int] = []
        for i, cost in costs.items():
            reason = gate.reserve(cost, wait=False)
            if reason is None:
                granted.append(i)
            elif granted:
                return granted, None  # no room beside this batch: the rest go in the next one
            else:
                return granted, reason  # nothing is in flight and it still does not fit
        return granted, None

    def complete(
        self,
        requests: list[ChatRequest],
        *,
        gate: CallGate = NO_BUDGET,
        on_result: OnResult[Completion] | None = None,
    ) -> list[Completion]:
        prompts = [self.engine.render_chat(r.messages()) for r in requests]
        out: list[Completion | None] = [None] * len(requests)
        costs: dict[int, int] = {}
        for i, prompt in enumerate(prompts):
            n = self._fits(prompt, self.max_tokens)
            if n is None:
                out[i] = Completion(
                    text=None,
                    error=f"prompt too long for the judge's {self.engine.context_length}-token "
                    f"context with judge.max_tokens={self.max_tokens}",
                    attempts=0,
                )
                if on_result is not None:
                    on_result(i, out[i])
            else:
                costs[i] = n + self.max_tokens
        params = [self._params(r) for r in requests]
        while costs:
            batch, refused = self._admit(costs, gate)
            results: list[Any] = []
            try:
                chosen = [prompts[i] for i in batch], [params[i] for i in batch]
                results = self.engine.generate(*chosen) if batch else []
            finally:
                for n, i in enumerate(batch):
                    r = results[n] if n < len(results) else None
                    gate.settle(costs.pop(i), r.prompt_tokens + r.completion_tokens if r else 0)
            for i, result in zip(batch, results, strict=True):
                choice = result.choices[0]
                out[i] = Completion(
                    text=choice.text,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    tokens=[
                        (lp.token, {t.token: t.logprob for t in lp.top} | {lp.token: lp.logprob})
                        for lp in choice.logprobs or []
                    ],
                )
                if on_result is not None:
                    on_result(i, out[i])
            if refused is not None:
                for i in costs:
                    out[i] = Completion(text=None, error=f"budget: {refused}", attempts=0)
                    if on_result is not None:
                        on_result(i, out[i])
                costs = {}
        return [c for c in out if c is not None]

    def _params(self, request: ChatRequest) -> SamplingParams:
        """Greedy judging with the verdict token's alternatives (its probabilities at no extra
        pass); a structured verdict is decoded under its schema's grammar, so it always parses."""
        from arenaflow.engine import SamplingParams
        from arenaflow.engine.constraints import Constraint

        schema = request.schema
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            logprobs=True,
            top_logprobs=20,
            constraint=Constraint.json_schema(schema) if schema is not None else None,
        )

    def _candidate_ids(self, output_format: str) -> dict[str, int]:
        """Verdict tokens that are single tokens of this tokenizer (`10` usually is not)."""
        out = {}
        for token in RATING_TOKENS if output_format == "[[rating]]" else PAIR_TOKENS:
            ids = self.engine.tokenizer.encode(token, add_special_tokens=False)
            if len(ids) == 1:
                out[token] = ids[0]
        return out

    def verdict_logprobs(
        self,
        requests: list[ChatRequest],
        judgments: list[str],
        output_format: str,
        *,
        gate: CallGate = NO_BUDGET,
        on_result: OnResult[Recovery] | None = None,
    ) -> list[Recovery]:
        """Logprobs of every verdict token (over the full vocabulary) after the forced prefix.

        One forward pass per prompt reads the exact next-token distribution, so a verdict is
        recovered even when no verdict token is among the top 20 alternatives.
        """
        out = []
        for i, (request, judgment) in enumerate(zip(requests, judgments, strict=True)):
            out.append(self._logprobs_one(request, judgment, output_format, gate))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def _logprobs_one(
        self, request: ChatRequest, judgment: str, output_format: str, gate: CallGate
    ) -> Recovery:
        prefix = VERDICT_PREFIX[output_format]
        candidates = self._candidate_ids(output_format)
        head = self.engine.render_chat(request.messages())
        prompt = head + judgment.rstrip() + prefix
        if self._fits(prompt, 1) is None:
            prompt = head + prefix.lstrip()  # the reply does not fit: ask for the verdict only
        if self._fits(prompt, 1) is None or not candidates:
            return Recovery(None, attempts=0)
        ids = self.engine.encode(prompt)
        refused = gate.reserve(len(ids) + 1)
        if refused is not None:
            return Recovery(None, attempts=0, error=f"budget: {refused}")
        used = len(ids) + 1
        try:
            logprobs = self.engine.next_token_logprobs(ids)
        except NotImplementedError as e:  # a backend without the full distribution (vLLM)
            used = 0
            return Recovery(None, attempts=0, error=str(e))
        finally:
            gate.settle(len(ids) + 1, used)
        top = {tok: float(logprobs[i]) for tok, i in candidates.items()}
        return Recovery(top, prompt_tokens=len(ids), completion_tokens=1)


def resolve_judge_checkpoint(cfg: DictConfig, base_model_path: str | Path | None = None) -> str:
    """The local judge's checkpoint: `judge.model` resolved like every model reference (`base` is
    the base model, else a folder / models:/ / runs:/ URI; `arenaflow.models.resolve_reference`)."""
    from arenaflow.models import resolve_reference

    base = str(base_model_path) if base_model_path is not None else None
    return resolve_reference(str(cfg.judge.model), cfg, base=base)


def judge_engine_spec(cfg: DictConfig) -> EngineSpec:
    """The engine the local judge runs on: `engine` (backend, weights) with the judge's own KV
    cache type (`judge.kv_cache`, null: engine.llamacpp.kv_cache). On llama.cpp over a CPU with
    bf16 instructions, f16 weights (model.quantization null) are read as bf16 instead: the demo's
    judging, the same answers run in turn, took 113-123 s in 4 bf16 runs against 131-151 s in 5
    f16 ones (1.18x; prefill 1.35x, 8-row steps 1.1x); 74 of 78 verdicts the same, calibration
    separation and pairwise accuracy too, swap consistency 0.22 against 0.33 (failing either
    way). Without those instructions llama.cpp emulates bf16, so f16 stays."""
    from arenaflow.engine.backends import EngineSpec, choose_backend
    from arenaflow.engine.llamacpp_runtime import check_kv_cache, cpu_has_bf16

    try:
        spec = EngineSpec.from_cfg(cfg)  # model.quantization, engine.llamacpp.kv_cache
        backend = choose_backend(spec.backend, spec.device)
    except ValueError as e:
        raise JudgeConfigError(str(e)) from e
    if backend == "llamacpp" and spec.quantization is None and cpu_has_bf16():
        spec = replace(spec, quantization="bf16")
    kv = cfg.judge.get("kv_cache")
    if kv is None:
        return spec
    try:
        check_kv_cache(str(kv))
    except ValueError as e:
        raise JudgeConfigError(str(e).replace("engine.llamacpp.kv_cache", "judge.kv_cache")) from e
    return replace(spec, llamacpp={**spec.llamacpp, "kv_cache": str(kv)})


def judge_identity(cfg: DictConfig, base_model_path: str | Path | None = None) -> dict[str, str]:
    """What the judge resolves to, for the cache key: the endpoint of an API judge; for the local
    judge, the registry version an alias names now, or the checkpoint folder's content hash, and
    the engine that runs it. A moved alias, a new base_url, a replaced checkpoint or another engine
    or precision never reuses old verdicts."""
    from arenaflow.models import model_identity

    j = cfg.judge
    if j.backend != "local":
        return {"endpoint": str(j.get("base_url") or "https://api.openai.com/v1")}
    from arenaflow.engine.backends import engine_identity

    ref = resolve_judge_checkpoint(cfg, base_model_path)
    tracking_uri = cfg.tracking.tracking_uri if cfg.tracking.enabled else None
    engine = engine_identity(judge_engine_spec(cfg))
    return {"checkpoint": model_identity(ref, tracking_uri), "engine": engine}
