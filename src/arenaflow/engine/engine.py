"""`Engine`: load a chat model once and generate for batches of prompts, synchronously or streamed.

One engine serves MT-bench answers, the local judge and the HTTP server, so prompts are always
rendered with the checkpoint's own chat template (the one training used) and a request means the
same thing everywhere.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arenaflow.engine.api import GenerationResult, PromptTooLongError, SamplingParams, StreamEvent
from arenaflow.engine.batch import Request, RunningBatch
from arenaflow.engine.constraints import ConstraintCompiler
from arenaflow.engine.penalties import check_token_ids

log = logging.getLogger(__name__)


class Engine:
    """A causal LM plus tokenizer; generation runs a continuous batch of at most `max_batch_size` rows."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        max_batch_size: int = 16,
        adapter: str | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter  # the peft adapter this engine's rows decode with; None: the base
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch_size = max_batch_size
        self.context_length = _context_length(model, tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
        self.constraints = ConstraintCompiler(tokenizer, self.eos_ids, vocab)
        self.lock = threading.Lock()  # one forward pass at a time on this model

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        tracking_uri: str | None = None,
        max_batch_size: int = 16,
        quantization: str | None = None,
    ) -> Engine:
        """Load a checkpoint folder or an MLflow registry URI (`models:/name/3`, `models:/name@alias`);
        an adapter checkpoint loads as its base with the adapter merged in (`models.load_model`);
        `quantization` (q8_0 | q4_k_m) loads 8-/4-bit weights through bitsandbytes."""
        from arenaflow.models import load_model, load_tokenizer

        model_id = str(model)
        path = resolve_checkpoint(model, tracking_uri)
        tokenizer = load_tokenizer(path)
        if not tokenizer.chat_template:
            raise ValueError(
                f"checkpoint {path} has no chat template; save one with the tokenizer "
                "(arenaflow.models.resolve_model does this via model.chat_template)"
            )
        lm = load_model(
            path, dtype=dtype, device=device, tracking_uri=tracking_uri, quantization=quantization
        )
        how = f"{dtype}, {quantization} weights" if quantization else dtype
        log.info("engine loaded %s (%s on %s) from %s", model_id, how, device, path)
        return cls(lm, tokenizer, model_id=model_id, max_batch_size=max_batch_size)

    def with_adapter(self, adapter: str, tokenizer: Any, *, model_id: str) -> Engine:
        """An engine whose rows decode with one of this (peft) model's adapters: the same weights,
        lock and batch as this one (`arenaflow.engine.adapters.load_shared`), its own chat template."""
        view = Engine(
            self.model,
            tokenizer,
            model_id=model_id,
            max_batch_size=self.max_batch_size,
            adapter=adapter,
        )
        view.lock = self.lock
        return view

    # -- prompts -------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a chat: the model's own template with the assistant turn opened."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt; a prompt that already starts with BOS (a rendered chat) gets no second one."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])

    def make_request(self, prompt: str, params: SamplingParams, **callbacks: Any) -> Request:
        """Validate a prompt + params into a batch request (raises ValueError / PromptTooLongError;
        InvalidConstraintError, a ValueError, for a schema or grammar that does not compile)."""
        params.validate()
        check_token_ids(params, len(self.tokenizer))
        grammar = self.constraints.compile(params.constraint) if params.constraint else None
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) + params.max_new_tokens > self.context_length:
            raise PromptTooLongError(len(ids), params.max_new_tokens, self.context_length)
        return Request(
            prompt_ids=ids, params=params, adapter=self.adapter, grammar=grammar, **callbacks
        )

    def next_token_logprobs(self, prompt_ids: list[int]) -> Any:
        """Log-probabilities over the whole vocabulary of the token after `prompt_ids` (one
        forward pass, a float tensor; the local judge reads its verdict token's distribution)."""
        import torch

        device = next(self.model.parameters()).device
        with self.lock, torch.no_grad():
            ids = torch.tensor([prompt_ids], device=device)
            logits = self.model(ids, logits_to_keep=1).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    # -- generation ----------------------------------------------------------------------------
    def new_batch(self) -> RunningBatch:
        return RunningBatch(
            self.model, self.tokenizer, self.eos_ids, self.context_length, self.max_batch_size
        )

    def generate(
        self, prompts: list[str], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Generate for all prompts, keeping up to `max_batch_size` rows busy; results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        requests = [self.make_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        self.run_requests(requests)
        failed = next((r.error for r in requests if r.error is not None), None)
        if failed is not None:
            raise failed
        return [r.build_result() for r in requests]

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        params: SamplingParams | list[SamplingParams],
    ) -> list[GenerationResult]:
        return self.generate([self.render_chat(c) for c in conversations], params)

    def run_requests(self, requests: list[Request]) -> None:
        """Continuous batching over a fixed list: a freed row is refilled at the next step."""
        pending = deque(requests)
        batch = self.new_batch()
        while pending or len(batch):
            admit: list[Request] = []
            free = self.max_batch_size - len(batch)
            while pending and (not admit and not len(batch) or pending[0].params.n <= free):
                free -= pending[0].params.n
                admit.append(pending.popleft())
            with self.lock:
                if admit:
                    batch.admit(admit)
                batch.step()

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[StreamEvent]:
        """Events for one request as tokens are produced (text deltas, then finish reasons and usage)."""
        events: list[StreamEvent] = []
        request = self.make_request(prompt, params, on_event=events.append)
        batch = self.new_batch()
        with self.lock:
            batch.admit([request])
        while True:
            yield from events
            events.clear()
            if request.error is not None:
                raise request.error
            if request.done:
                return
            with self.lock:
                batch.step()


def resolve_checkpoint(model: str | Path, tracking_uri: str | None = None) -> Path:
    """A local checkpoint folder for a folder path or an MLflow `models:/` URI."""
    text = str(model)
    if text.startswith("models:/"):
        import os

        from arenaflow.tracking import MlflowTracker

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError(
                f"cannot load {text}: no MLflow tracking URI; pass tracking_uri= "
                "(the config's tracking.tracking_uri) or set MLFLOW_TRACKING_URI"
            )
        return MlflowTracker(uri, "arenaflow").download_model(text)
    from arenaflow.adapters import is_checkpoint

    path = Path(text)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a Hugging Face checkpoint folder (no config.json) nor an adapter "
            "folder (no adapter_config.json); "
            "give a checkpoint folder or an MLflow URI models:/name/version or models:/name@alias"
        )
    return path


def _context_length(model: Any, tokenizer: Any) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if n is None:
        n = limit if limit and limit < 10**7 else 2048
    return int(n)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
