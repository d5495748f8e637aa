"""FastChat's training recipe (HF Trainer, every row padded to model_max_length) and the step
timing summary both recipes are measured with, for bench_train.py."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from arenaflow.data.sft import IGNORE_INDEX
from arenaflow.train.flops import model_shape, train_flops

MAX_LENGTH = 512


def trained_tokens(samples: list[dict]) -> int:
    """Labelled next-token targets in the samples (the tokens a recipe trains on)."""
    return sum(sum(t != IGNORE_INDEX for t in s["labels"][1:]) for s in samples)


def throughput(
    rows: list[dict], shape, peak: float, head_tokens: bool, frozen_weights: bool = False
) -> dict:
    """trained tok/s, tok/s and MFU over steps given as {seconds, trained, tokens, attn_sq}."""
    dt = sum(r["seconds"] for r in rows)
    trained = sum(r["trained"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    flops = train_flops(
        shape,
        tokens,
        sum(r["attn_sq"] for r in rows),
        head_tokens=trained if head_tokens else None,
        frozen_weights=frozen_weights,
    )
    return {
        "seconds": dt,
        "trained_tokens_per_s": trained / dt,
        "tokens_per_s": tokens / dt,
        "mfu": flops / dt / peak,
    }


def measure(
    rows: list[dict],
    per_epoch: int,
    shape,
    peak: float,
    head_tokens: bool,
    frozen_weights: bool = False,
) -> dict:
    """The last epoch (steady state) as the result; the first epoch after its first step as cold."""
    warm = throughput(rows[-per_epoch:], shape, peak, head_tokens, frozen_weights)
    cold = throughput(rows[1:per_epoch] or rows[:1], shape, peak, head_tokens, frozen_weights)
    return {**warm, "steps": len(rows), "cold": cold}


def bench_fastchat(
    model_dir: Path,
    tokenizer,
    samples: list[dict],
    peak: float,
    work: Path,
    micro: int,
    epochs: int,
) -> dict:
    """FastChat train.py's recipe: pad to model_max_length, HF Trainer, same optimizer settings."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    rows = []
    for s in samples:
        pad = MAX_LENGTH - len(s["input_ids"])
        rows.append(
            {
                "input_ids": s["input_ids"] + [tokenizer.pad_token_id] * pad,
                "labels": s["labels"] + [IGNORE_INDEX] * pad,
                "attention_mask": [1] * len(s["input_ids"]) + [0] * pad,
            }
        )
    ds = Dataset.from_list(rows).with_format("torch")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    shape = model_shape(model.config)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    class InOrder(Trainer):
        """Batches in sample order, so each timed step's samples are known (every row is padded
        to the same length, so the order cannot change FastChat's speed)."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    timer = StepTimer()
    args = TrainingArguments(
        output_dir=str(work / "fastchat"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=1,
        num_train_epochs=epochs,
        learning_rate=2e-5,
        weight_decay=0.0,
        warmup_steps=0.03,  # a ratio of the total steps
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_drop_last=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    InOrder(model=model, args=args, train_dataset=ds, callbacks=[timer]).train()
    batches = [samples[i : i + micro] for i in range(0, len(samples), micro)]
    steps = [
        {
            "seconds": dt,
            "trained": trained_tokens(batch),
            "tokens": sum(len(s["input_ids"]) for s in batch),
            "attn_sq": sum(len(s["input_ids"]) ** 2 for s in batch),
        }
        for dt, batch in zip(timer.times, batches * epochs, strict=True)
    ]
    result = measure(steps, len(batches), shape, peak, head_tokens=False)
    padded = sum(len(b) * MAX_LENGTH for b in batches)
    result["padded_tokens_per_s"] = padded / sum(r["seconds"] for r in steps[-len(batches) :])
    return {"recipe": "fastchat (HF Trainer, pad to 512)", **result}
