"""Parity of llama.cpp on arenaflow's GGUF exports with the hf engine, on greedy MT-bench turns.

    .venv/bin/python benchmarks/bench_gguf_parity.py [--per-category 10] [--max-new-tokens 128]
        [--formats f16,q8_0,q4_k_m] [--threads 2]

The base checkpoint (SmolLM2-135M-Instruct, packaged) is exported to GGUF at each format with
arenaflow's own writer and llama.cpp's quantizer (`arenaflow.export`), then every MT-bench turn is
answered greedily by the hf engine (the reference) and by llama.cpp on each export, batched as
`make run` answers them. Turn 2's history holds the reference's turn 1 on every backend, so a turn-2
difference is the engine's, not a cascade of turn 1's. Printed per format: turns identical to the
reference (target for f16: >= 95%), token agreement (the common prefix over the longer answer,
averaged), the median first differing token, tok/s; and the template drift check: the rendered
prompts' token ids from the checkpoint's tokenizer (what every backend is fed) against llama.cpp's
own tokenizer reading the GGUF's embedded vocabulary (what a bare GGUF consumer would feed).
A second hf row runs the hf engine over weights rounded to f16 (what the f16 file holds): its
agreement is the share of the gap that is the rounding of the weights, and the last line compares
llama.cpp's f16 with it, the same weights in two engines.

MT-bench score deltas are not printed: they need a judge, and the default local judge fails its
own calibration (`benchmarks/bench_judge.py`), so its score differences would not mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from arenaflow.config import compose_config
from arenaflow.engine import Engine, SamplingParams
from arenaflow.engine.backends import EngineSpec, load_engine
from arenaflow.evaluate.questions import load_questions, question_source, select_questions
from arenaflow.models import resolve_model

Turns = list[list[int]]  # token ids of each turn, question-major (q1t1, q1t2, q2t1, ...)


def answer(
    engine: Engine, questions: list[dict[str, Any]], reference: list[str] | None, max_new: int
):
    """Greedy token ids and texts of every turn; turn 2 sees `reference`'s turn 1 when given
    (else the engine's own). Returns (token ids, texts, rendered prompts, tokens/s)."""
    params = SamplingParams(max_new_tokens=max_new)
    firsts = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    started = time.perf_counter()
    r1 = engine.chat(firsts, params)
    t1 = [r.choices[0].text.strip() for r in r1]
    history = reference[0::2] if reference else t1
    seconds = [
        [*c, {"role": "assistant", "content": h}, {"role": "user", "content": q["turns"][1]}]
        for c, h, q in zip(firsts, history, questions, strict=True)
    ]
    r2 = engine.chat(seconds, params)
    elapsed = time.perf_counter() - started
    ids, texts, prompts = [], [], []
    for a, b, c1, c2 in zip(r1, r2, firsts, seconds, strict=True):
        ids += [a.choices[0].token_ids, b.choices[0].token_ids]
        texts += [a.choices[0].text.strip(), b.choices[0].text.strip()]
        prompts += [engine.render_chat(c1), engine.render_chat(c2)]
    generated = sum(len(t) for t in ids)
    return ids, texts, prompts, generated / elapsed


def agreement(ref: Turns, other: Turns) -> dict[str, float]:
    same, shares, firsts = 0, [], []
    for a, b in zip(ref, other, strict=True):
        prefix = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        longer = max(len(a), len(b))
        same += a == b
        shares.append(1.0 if longer == 0 else prefix / longer)
        if a != b:
            firsts.append(prefix)
    return {
        "identical": same / len(ref),
        "tokens": statistics.fmean(shares),
        "first_diff": statistics.median(firsts) if firsts else float("nan"),
    }


def drift(engine: Engine, prompts: list[str]) -> int:
    """Prompts whose checkpoint-tokenizer ids differ from llama.cpp's own tokenization."""
    runtime = engine.runtime  # a LlamaCppEngine
    return sum(engine.encode(p) != runtime.tokenize(p) for p in prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--per-category", type=int, default=10, help="questions of each of the 8 categories"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--formats", default="f16,q8_0,q4_k_m")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: every core)")
    args = ap.parse_args()

    cfg = compose_config(["model=smollm2_135m"])
    path = resolve_model(cfg.model, cfg.paths.cache_dir)
    questions, _ = load_questions(question_source(cfg))
    questions = select_questions(questions, None, args.per_category)
    print(
        f"{len(questions)} MT-bench questions x 2 turns, greedy, max_new_tokens={args.max_new_tokens}"
    )

    hf = load_engine(path, EngineSpec(backend="hf"), max_batch_size=16)
    ref_ids, ref_texts, prompts, hf_tps = answer(hf, questions, None, args.max_new_tokens)
    rows = [("hf (reference)", 1.0, 1.0, float("nan"), hf_tps, "")]
    # the same engine over the weights the f16 file holds: how much of a gap is the rounding alone
    for p in hf.model.parameters():
        p.data = p.data.half().float()
    f16_ids, _, _, tps = answer(hf, questions, ref_texts, args.max_new_tokens)
    a = agreement(ref_ids, f16_ids)
    rows.append(("hf, f16 weights", a["identical"], a["tokens"], a["first_diff"], tps, ""))
    same_weights = None
    with tempfile.TemporaryDirectory() as cache:
        for fmt in args.formats.split(","):
            quant = None if fmt == "f16" else fmt
            opts = {"n_ctx": 2048, "n_threads": args.threads or None}
            spec = EngineSpec(
                backend="llamacpp", quantization=quant, cache_dir=cache, llamacpp=opts
            )
            engine = load_engine(path, spec, max_batch_size=16)
            ids, _, own_prompts, tps = answer(engine, questions, ref_texts, args.max_new_tokens)
            assert own_prompts == prompts, "the backends rendered different prompts"
            a = agreement(ref_ids, ids)
            drifted = drift(engine, prompts)
            if fmt == "f16":
                same_weights = agreement(f16_ids, ids)
            rows.append(
                (
                    f"llama.cpp {fmt}",
                    a["identical"],
                    a["tokens"],
                    a["first_diff"],
                    tps,
                    f"{drifted}/{len(prompts)}",
                )
            )
            engine.close()

    print(
        f"\n{'backend':<18}{'turns identical':>16}{'token agreement':>17}{'1st diff (med)':>16}"
        f"{'tok/s':>8}{'  prompt-id drift':>18}"
    )
    for name, same, tokens, first, tps, drifted in rows:
        print(f"{name:<18}{same:>15.1%}{tokens:>17.1%}{first:>16.0f}{tps:>8.1f}{drifted:>18}")
    f16 = next((r for r in rows if r[0] == "llama.cpp f16"), None)
    if f16:
        verdict = "met" if f16[1] >= 0.95 else "NOT met"
        print(f"\nf16 turns identical to the hf engine: {f16[1]:.1%} (target >= 95%: {verdict})")
    if same_weights:
        print(
            f"llama.cpp f16 against hf over the same f16-rounded weights: "
            f"{same_weights['identical']:.1%} turns identical, {same_weights['tokens']:.1%} tokens"
        )


if __name__ == "__main__":
    main()
