"""The llama.cpp backend: a GGUF decoded by llama.cpp behind the same interface as `Engine`.

`LlamaCppBatch` is a `RunningBatch` whose model part (prefill, one decode step for all rows,
dropping rows) runs in llama.cpp, one KV stream per row (`GgufRuntime`); sampling, stop strings,
seeds, logprobs, n, constraints and streaming are `RunningBatch`'s own code, so a request means
the same thing on both backends. `LlamaCppEngine` is an `Engine` whose batches are those: the
prompt is rendered by the checkpoint's Hugging Face tokenizer (its chat template), as everywhere.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from arenaflow.engine.batch import _EMPTY, Request, RunningBatch
from arenaflow.engine.constraints import ConstraintCompiler
from arenaflow.engine.engine import Engine
from arenaflow.engine.llamacpp_runtime import GgufModel, GgufRuntime
from arenaflow.engine.streams import COMPACT_MIN_STEPS, StreamPool, prefill_from_pool

log = logging.getLogger(__name__)


class LlamaCppBatch(RunningBatch):
    """Rows decoded together by llama.cpp; row i lives in KV stream `self.seqs[i]`."""

    def __init__(self, engine: LlamaCppEngine) -> None:  # no torch model: RunningBatch's state only
        self.runtime = engine.runtime
        self.tokenizer = engine.tokenizer
        self.eos_ids = engine.eos_ids
        self.context_length = engine.context_length
        self.max_batch_size = engine.max_batch_size
        self.rows = []
        self.cache = None
        self.positions = _EMPTY
        self.next_tokens = _EMPTY
        self.last_batch_size = 0
        self.steps = 0
        self.peft = False
        self.seqs: list[int] = []  # KV stream of each row
        self.moves = 0  # rows moved to another stream, so the batch's streams stay consecutive
        self.pool = engine.streams  # the engine's streams no row of any batch holds

    def admit(self, requests: list[Request]) -> list[Request]:
        """Prefill each prompt into a free stream (its n choices get copies of it) and sample
        every new row's first token; returns requests finished already (or failed alone)."""
        ok, lasts, streams = [], [], []
        for r in requests:
            try:
                self._check(r)
                taken, last = prefill_from_pool(self.runtime, self.pool, r.prompt_ids, r.params.n)
                lasts.append(torch.from_numpy(last))
                ok.append(r)
                streams.extend(taken)
            except Exception as e:  # no free stream, no KV slot: this request fails alone
                r.fail(e)
        failed = [r for r in requests if r.error is not None]
        seqs = [s for r in ok for s in r.seqs]
        if not seqs:
            return failed
        logits = torch.cat(
            [last[None].expand(r.params.n, -1) for last, r in zip(lasts, ok, strict=True)]
        )
        lengths = torch.tensor([len(s.request.prompt_ids) for s in seqs], dtype=torch.long)
        self.positions = torch.cat([self.positions, lengths])
        self.rows.extend(seqs)
        self.seqs.extend(streams)
        self.next_tokens = torch.cat([self.next_tokens, self._sample(logits, seqs)])
        return failed + self._finish_rows()

    def _check(self, r: Request) -> None:
        if r.adapter is not None:
            raise ValueError("the llama.cpp backend serves no LoRA adapters; use engine.backend=hf")
        if r.params.n > len(self.pool.free):
            raise ValueError(
                f"n={r.params.n} needs more rows than the {len(self.pool.free)} free of "
                f"{self.max_batch_size} (serve.max_batch_size)"
            )

    def step(self) -> list[Request]:
        """Decode one token for every row; returns the requests that finished in this step."""
        if not self.rows:
            return []
        self._compact()
        logits = self.runtime.step(
            self.next_tokens.tolist(), self.positions.tolist(), list(self.seqs)
        )
        self.positions = self.positions + 1
        self.last_batch_size = len(self.rows)
        self.steps += 1
        self.next_tokens = self._sample(torch.from_numpy(logits), self.rows)
        return self._finish_rows()

    def _compact(self) -> None:
        """Move rows so that their streams are consecutive ids, when they may run long enough.

        Over separate KV streams llama.cpp decodes a batch in one pass only for consecutive
        stream ids; each gap (a finished row's stream, inside the batch's range) splits a step
        into another pass over the weights: 8 rows of SmolLM2-135M f16 at 800 tokens took 44.5
        ms a step in consecutive streams, 60.0 ms across 2 gaps, 81.8 ms across 7. A row
        outside the window moves into a free stream inside it (a copy of its stream), and what
        that stream cached moves first to a free stream outside, so no cached prefix is lost
        while a spare stream is left."""
        n = len(self.seqs)
        ours = set(self.seqs)
        if max(ours) - min(ours) + 1 == n:
            return
        steps_left = max(r.request.params.max_new_tokens - r.generated for r in self.rows)
        if steps_left < COMPACT_MIN_STEPS:
            return
        free = set(self.pool.free)
        windows = [
            (sum(i in ours for i in range(w, w + n)), -w)
            for w in range(self.pool.size - n + 1)
            if all(i in ours or i in free for i in range(w, w + n))
        ]
        if not windows:
            return  # another batch holds streams in every window
        start = -max(windows)[1]
        window = set(range(start, start + n))
        holes = sorted(window - ours)
        spares = [t for t in self.pool.free if t not in window]  # oldest release first
        movers = [i for i, seq in enumerate(self.seqs) if seq not in window]
        for i, hole in zip(movers, holes, strict=True):
            kept = self.pool.cached.get(hole)
            if kept and spares:
                spare = spares.pop(0)
                self.runtime.copy_seq(hole, spare)
                self.pool.cached[spare] = kept
            old = self.seqs[i]
            self.runtime.copy_seq(old, hole)
            self.pool.take_stream(hole)
            self.pool.hold(hole, self.rows[i].request.prompt_ids)
            self.pool.give_back(old, self._held_tokens(i))
            self.seqs[i] = hole
            self.moves += 1

    def _held_tokens(self, i: int) -> list[int]:
        """The tokens row i's KV holds: its prompt and every token fed back."""
        prompt = self.rows[i].request.prompt_ids
        return prompt + self.rows[i].token_ids[: int(self.positions[i]) - len(prompt)]

    def _keep_rows(self, keep: list[int]) -> None:
        kept = set(keep)
        for i, (s, row) in enumerate(zip(self.seqs, self.rows, strict=True)):
            if i in kept:
                continue
            if row.request.error is not None:  # its KV is not trusted: nothing stays cached
                self.runtime.drop_seq(s)
                self.pool.give_back(s)
                continue
            self.pool.give_back(s, self._held_tokens(i))
        idx = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.seqs = [self.seqs[i] for i in keep]
        self.positions = self.positions[idx]
        self.next_tokens = self.next_tokens[idx]

    def cancel_all(self, error: BaseException) -> list[Request]:
        for s in self.seqs:
            self.runtime.drop_seq(s)
            self.pool.give_back(s)
        self.seqs = []
        return super().cancel_all(error)


class LlamaCppEngine(Engine):
    """An `Engine` over a GGUF in llama.cpp: the same prompts, requests and results.

    The context's `max_batch_size` KV streams are shared by all of this engine's batches (the
    `Scheduler`'s, those of `generate` / `stream`): a row holds one while it decodes, and a
    request finding none free fails alone with a ValueError."""

    def __init__(
        self,
        gguf: str | Path | GgufModel,
        tokenizer: Any,
        *,
        model_id: str,
        max_batch_size: int = 16,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        kv_cache: str = "f32",
        eos_ids: set[int] | None = None,
        lora: str | Path | None = None,
    ) -> None:
        self.runtime = GgufRuntime(
            gguf,
            n_seq_max=max_batch_size,
            n_ctx_seq=n_ctx,
            n_threads=n_threads,
            kv_cache=kv_cache,
            lora=lora,
        )
        self.gguf = self.runtime.weights.path
        self.lora = Path(lora) if lora else None
        self.model = None
        self.adapter = None
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch_size = max_batch_size
        self.context_length = self.runtime.n_ctx_seq
        self.eos_ids = eos_ids or _gguf_eos_ids(tokenizer, self.runtime)
        self.constraints = ConstraintCompiler(tokenizer, self.eos_ids, self.runtime.n_vocab)
        self.lock = threading.RLock()  # llama.cpp's context: one decode at a time
        self.streams = StreamPool(max_batch_size)

    @classmethod
    def load(  # type: ignore[override]
        cls,
        model: str | Path,
        *,
        gguf: str | Path | None = None,
        tracking_uri: str | None = None,
        **options: Any,
    ) -> LlamaCppEngine:
        """A checkpoint folder or registry URI on llama.cpp: its tokenizer (chat template) and
        `gguf`, else the checkpoint's GGUF export (`backends.gguf_for`, made once, cached). An
        adapter folder runs as its base's GGUF with the adapter's GGUF LoRA applied.
        `options`: max_batch_size, n_ctx, n_threads, kv_cache, quantization, cache_dir."""
        from arenaflow.adapters import base_folder, is_adapter, read_adapter
        from arenaflow.engine.engine import resolve_checkpoint

        path = resolve_checkpoint(model, tracking_uri)
        if not is_adapter(path):
            base, adapter = path, None
        else:
            base, adapter = base_folder(read_adapter(path), tracking_uri), path
        engines = cls.group(
            base, {str(model): adapter}, gguf=gguf, tracking_uri=tracking_uri, **options
        )
        return engines[str(model)]

    @classmethod
    def group(
        cls,
        base: Path,
        models: dict[str, Path | None],
        *,
        gguf: str | Path | None = None,
        tracking_uri: str | None = None,
        max_batch_size: int = 16,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        kv_cache: str = "f32",
        quantization: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> dict[str, LlamaCppEngine]:
        """{name: engine} over one copy of the base checkpoint folder `base`'s GGUF (`gguf`, else
        its export at `quantization`): for each name an adapter folder (its GGUF LoRA applied
        in the engine's own context) or None (the base itself). Each engine has its own KV
        streams and batch; llama.cpp applies one adapter set per context, so rows of different
        adapters do not share a decode step as they do in the hf engine."""
        from arenaflow.engine.backends import gguf_for
        from arenaflow.export.registry import resolve_lora_gguf
        from arenaflow.models import load_tokenizer

        base_tok = load_tokenizer(base)
        tokenizers = {n: load_tokenizer(a) if a else base_tok for n, a in models.items()}
        for name, tok in tokenizers.items():
            where = models[name] or base
            if not tok.chat_template:
                raise ValueError(f"checkpoint {where} has no chat template; save one with it")
            if tok is not base_tok and tok.get_vocab() != base_tok.get_vocab():
                raise ValueError(
                    f"adapter {where} has another vocabulary than its base {base}; serve it merged"
                )
        path = Path(gguf) if gguf else gguf_for(base, quantization, cache_dir, tracking_uri)
        weights = GgufModel(path)
        eos = _checkpoint_eos_ids(base, base_tok)
        out: dict[str, LlamaCppEngine] = {}
        try:
            for name, adapter in models.items():
                lora = adapter and resolve_lora_gguf(adapter, base, cache_dir or adapter.parent)
                out[name] = cls(
                    weights,
                    tokenizers[name],
                    model_id=name,
                    max_batch_size=max_batch_size,
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    kv_cache=kv_cache,
                    eos_ids=eos,
                    lora=lora,
                )
        except BaseException:
            for engine in out.values():
                engine.close()
            raise
        finally:
            if not out:
                weights.release()
        log.info("llama.cpp: %s over one copy of %s", ", ".join(out), path)
        return out

    def with_adapter(self, adapter: str, tokenizer: Any, *, model_id: str) -> Engine:
        raise ValueError(
            "llama.cpp applies one adapter set per context: its adapters are engines of their own "
            "over shared weights (LlamaCppEngine.group), not rows of one batch"
        )

    def next_token_logprobs(self, prompt_ids: list[int]) -> torch.Tensor:
        """The full next-token distribution after `prompt_ids`, prefilled into a free KV stream
        that is cleared again."""
        with self.lock:
            if not self.streams.free:
                raise ValueError(f"all {self.max_batch_size} KV streams are busy")
            [seq], logits = prefill_from_pool(self.runtime, self.streams, prompt_ids)
            self.streams.give_back(seq, list(prompt_ids))
        return torch.log_softmax(torch.from_numpy(logits).float(), dim=-1)

    def new_batch(self) -> LlamaCppBatch:
        return LlamaCppBatch(self)

    def close(self) -> None:
        self.runtime.close()


def _checkpoint_eos_ids(path: Path, tokenizer: Any) -> set[int]:
    """The eos set the hf engine uses for this checkpoint (its config, generation config and
    tokenizer), so a row ends on the same tokens in both backends."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    from arenaflow.engine.engine import _eos_ids

    try:
        generation = GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json
        generation = None
    model = SimpleNamespace(
        config=AutoConfig.from_pretrained(str(path)), generation_config=generation
    )
    return _eos_ids(model, tokenizer)


def _gguf_eos_ids(tokenizer: Any, runtime: GgufRuntime) -> set[int]:
    """A bare GGUF's end tokens (eos, eot) and the tokenizer's eos."""
    ids = set(runtime.eog_ids())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
