"""MT-bench answer generation: arenaflow's batched engine vs FastChat's one-question-at-a-time loop.

    .venv/bin/python benchmarks/bench_generate.py [--questions 16] [--max-new-tokens 128] [--batch-size 16]
    .venv/bin/python benchmarks/bench_generate.py --engine hf,llamacpp [--max-new-tokens 96] [--threads 2]

Both sides answer the same MT-bench questions (two turns, turn 2 sees the model's own turn 1) with
SmolLM2-135M-Instruct, the same chat template and the MT-bench paper's per-category temperatures.
The peer reproduces FastChat 0.2.36 `gen_model_answer.get_model_answers`: for each question, for
each turn, `model.generate(do_sample=temperature > 1e-4, temperature, max_new_tokens)` on one prompt.
(FastChat's own function cannot run here: it loads models with `device="cuda"` hard-coded and picks a
conversation template by model name, which for this checkpoint is not the model's own template.)
Prints tokens/s of both, the speed-up, and the share of temperature-0 turns identical to unbatched
greedy decoding.

`--engine hf,llamacpp[,vllm]` instead runs each engine backend (`engine.backend`) in its own process
on 8 chat prompts, greedy: tok/s one request at a time and 16 at once, time to first token, resident
memory; and llama.cpp's own high-level `Llama` on the same GGUF, so the ratio arenaflow on llama.cpp
/ raw llama.cpp (target >= 0.90) and concurrency 16 / concurrency 1 (target >= 3x) are printed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psutil
import torch

from arenaflow.config import compose_config
from arenaflow.engine import Engine, SamplingParams
from arenaflow.evaluate.questions import load_questions, question_source, select_questions
from arenaflow.models import load_model, load_tokenizer, resolve_model

TEMPS = {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1}


def temperature(category: str) -> float:
    return TEMPS.get(category, 0.0)


def ours(
    engine: Engine, questions: list[dict[str, Any]], max_new: int
) -> tuple[dict, int, float, float]:
    answers: dict[int, list[str]] = {q["question_id"]: [] for q in questions}
    tokens, started, cpu = 0, time.perf_counter(), time.process_time()
    for t in range(2):
        chats = []
        for q in questions:
            chat = []
            for k in range(t):
                chat += [
                    {"role": "user", "content": q["turns"][k]},
                    {"role": "assistant", "content": answers[q["question_id"]][k]},
                ]
            chats.append([*chat, {"role": "user", "content": q["turns"][t]}])
        params = [
            SamplingParams(
                max_new_tokens=max_new,
                temperature=temperature(q["category"]),
                seed=q["question_id"],
            )
            for q in questions
        ]
        for q, r in zip(questions, engine.chat(chats, params), strict=True):
            answers[q["question_id"]].append(r.choices[0].text.strip())
            tokens += r.completion_tokens
    return answers, tokens, time.perf_counter() - started, time.process_time() - cpu


@torch.inference_mode()
def fastchat_loop(
    model: Any, tok: Any, questions: list[dict[str, Any]], max_new: int
) -> tuple[dict, int, float, float]:
    """FastChat's get_model_answers, one question and one turn at a time with HF generate."""
    answers: dict[int, list[str]] = {}
    tokens, started, cpu = 0, time.perf_counter(), time.process_time()
    for q in questions:
        temp = temperature(q["category"])
        torch.manual_seed(q["question_id"])
        chat: list[dict[str, str]] = []
        turns = []
        for turn in q["turns"]:
            chat.append({"role": "user", "content": turn})
            prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            input_ids = tok([prompt], add_special_tokens=False).input_ids
            out = model.generate(
                torch.as_tensor(input_ids),
                do_sample=temp >= 1e-4,
                temperature=temp if temp >= 1e-4 else None,
                top_p=None,
                top_k=None,
                max_new_tokens=max_new,
                pad_token_id=tok.pad_token_id,
            )
            new = out[0][len(input_ids[0]) :]
            tokens += len(new)
            text = tok.decode(new, skip_special_tokens=True).strip()
            turns.append(text)
            chat.append({"role": "assistant", "content": text})
        answers[q["question_id"]] = turns
    return answers, tokens, time.perf_counter() - started, time.process_time() - cpu


def unbatched_greedy(engine: Engine, questions: list[dict[str, Any]], max_new: int) -> dict:
    out = {}
    for q in questions:
        chat: list[dict[str, str]] = []
        turns = []
        for turn in q["turns"]:
            chat.append({"role": "user", "content": turn})
            text = (
                engine.chat([chat], SamplingParams(max_new_tokens=max_new))[0]
                .choices[0]
                .text.strip()
            )
            turns.append(text)
            chat.append({"role": "assistant", "content": text})
        out[q["question_id"]] = turns
    return out


# -- engines side by side (--engine hf,llamacpp[,vllm]) ----------------------------------------
ENGINE_PROMPTS = 8  # chat prompts (MT-bench first turns), greedy, as measured in issue 21


def load_bench_engine(name: str, path: Any, gguf: str | None, threads: int, rows: int) -> Engine:
    from arenaflow.engine.backends import EngineSpec, load_engine

    opts = {"gguf": gguf, "n_ctx": 1024, "n_threads": threads or None}
    spec = EngineSpec(backend=name, device="cuda" if name == "vllm" else "cpu", llamacpp=opts)
    return load_engine(path, spec, max_batch_size=rows)


def engine_figures(engine: Engine, prompts: list[str], max_new: int) -> dict[str, float]:
    """tok/s one request at a time and 16 at once (continuous batch), time to first token."""
    greedy = SamplingParams(max_new_tokens=max_new)
    first = []
    tokens, started = 0, time.perf_counter()
    for p in prompts:
        t0 = time.perf_counter()
        for i, event in enumerate(engine.stream(p, greedy)):
            if i == 0:
                first.append(time.perf_counter() - t0)
            tokens += event.finish_reason is None or event.token_id not in engine.eos_ids
    b1 = tokens / (time.perf_counter() - started)
    many = [prompts[i % len(prompts)] for i in range(16)]
    started = time.perf_counter()
    results = engine.generate(many, greedy)
    c16 = sum(len(r.choices[0].token_ids) for r in results) / (time.perf_counter() - started)
    ttft = sorted(first)[len(first) // 2]
    rss = psutil.Process().memory_info().rss / 2**20
    return {"b1": b1, "c16": c16, "ttft_ms": 1000 * ttft, "rss_mib": rss}


def raw_llama_cpp(gguf: str, prompt_ids: list[list[int]], max_new: int, threads: int) -> float:
    """llama.cpp's own high-level `Llama`, greedy, one prompt at a time: tok/s."""
    import llama_cpp
    from llama_cpp import llama as high_level

    default = high_level.llama_cpp.llama_model_default_params

    def no_amx():  # as GgufRuntime, which turns them off (the class has no switch for it)
        p = default()
        p.use_extra_bufts = False
        return p

    high_level.llama_cpp.llama_model_default_params = no_amx
    kw = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    kv = llama_cpp.GGML_TYPE_F32  # the KV cache arenaflow's engine has (engine.llamacpp.kv_cache)
    llm = llama_cpp.Llama(gguf, n_ctx=1024, verbose=False, type_k=kv, type_v=kv, **kw)
    eos = {llm.token_eos()}
    tokens, started = 0, time.perf_counter()
    for ids in prompt_ids:
        for n, token in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            if token in eos or n == max_new:
                break
            tokens += 1
    return tokens / (time.perf_counter() - started)


def one_engine(args: argparse.Namespace) -> None:
    """Child process: one engine's figures as a JSON line (resident memory of that engine alone)."""
    import json

    path, gguf, prompts = bench_inputs(args)
    if args.one == "raw":
        tok = load_tokenizer(path)
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = {"b1": raw_llama_cpp(gguf, ids, args.max_new_tokens, args.threads)}
    else:
        engine = load_bench_engine(args.one, path, gguf, args.threads, 16)
        out = engine_figures(engine, prompts, args.max_new_tokens)
    print("RESULT " + json.dumps(out), flush=True)


def bench_inputs(args: argparse.Namespace) -> tuple[Any, str, list[str]]:
    """The base checkpoint, the GGUF llama.cpp runs (--gguf, else the packaged one the base is
    made from) and the chat prompts rendered with the checkpoint's template."""
    from arenaflow.models import find_package_file

    cfg = compose_config(["model=smollm2_135m"])
    path = resolve_model(cfg.model, cfg.paths.cache_dir)
    gguf = args.gguf or str(find_package_file(cfg.model.package, cfg.model.gguf_file))
    all_q, _ = load_questions(question_source(cfg))
    tok = load_tokenizer(path)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q["turns"][0]}], tokenize=False, add_generation_prompt=True
        )
        for q in all_q[:ENGINE_PROMPTS]
    ]
    return path, gguf, prompts


def compare_engines(args: argparse.Namespace) -> None:
    import json
    import subprocess
    import sys

    names = [n.strip() for n in args.engine.split(",") if n.strip()]
    if "llamacpp" in names:
        names.append("raw")
    figures = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
        cmd += ["--threads", str(args.threads)] + (["--gguf", args.gguf] if args.gguf else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        figures[name] = json.loads(line[len("RESULT ") :])
    print(
        f"{ENGINE_PROMPTS} chat prompts x {args.max_new_tokens} new tokens, greedy; "
        f"threads={args.threads or 'all'}"
    )
    print(
        f"{'engine':<10} {'b1 tok/s':>9} {'conc16 tok/s':>13} {'c16/b1':>7} {'TTFT ms':>8} {'RSS MiB':>8}"
    )
    for name, f in figures.items():
        if name == "raw":
            print(f"{'raw llama.cpp':<10} {f['b1']:>9.1f}")
            continue
        print(
            f"{name:<10} {f['b1']:>9.1f} {f['c16']:>13.1f} {f['c16'] / f['b1']:>6.2f}x "
            f"{f['ttft_ms']:>8.0f} {f['rss_mib']:>8.0f}"
        )
    if "llamacpp" in figures and "raw" in figures:
        ratio = figures["llamacpp"]["b1"] / figures["raw"]["b1"]
        print(f"arenaflow on llama.cpp / raw llama.cpp at batch 1: {ratio:.2f} (target >= 0.90)")
    for name in ("llamacpp", "vllm"):
        if name in figures:
            f = figures[name]
            print(
                f"{name} concurrency 16 / concurrency 1: {f['c16'] / f['b1']:.2f}x (target >= 3x)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument(
        "--engine",
        default=None,
        help="hf,llamacpp[,vllm]: the engines side by side (b1 / conc16 tok/s, TTFT, RSS) and "
        "raw llama.cpp on the same GGUF, instead of the FastChat comparison",
    )
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the packaged one)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one engine's figures
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        return one_engine(args)
    if args.engine:
        return compare_engines(args)

    cfg = compose_config(["model=smollm2_135m"])
    path = resolve_model(cfg.model, cfg.paths.cache_dir)
    all_q, _ = load_questions(question_source(cfg))
    questions = select_questions(all_q, limit_per_category=max(1, args.questions // 8))[
        : args.questions
    ]
    greedy_q = [q for q in questions if temperature(q["category"]) == 0.0]
    print(
        f"{len(questions)} questions x 2 turns, max_new_tokens={args.max_new_tokens}, "
        f"torch threads={torch.get_num_threads()}, model={path}"
    )

    engine = Engine.load(path, max_batch_size=args.batch_size)
    ours_answers, ours_tokens, ours_s, ours_cpu = ours(engine, questions, args.max_new_tokens)
    ours_tps = ours_tokens / ours_s
    print(
        f"arenaflow batched engine: {ours_tokens} tokens in {ours_s:.1f}s wall / {ours_cpu:.1f}s CPU "
        f"= {ours_tps:.1f} tokens/s ({ours_tokens / ours_cpu:.1f} tokens per CPU-second)"
    )

    model, tok = load_model(path), load_tokenizer(path)
    fc_answers, fc_tokens, fc_s, fc_cpu = fastchat_loop(model, tok, questions, args.max_new_tokens)
    fc_tps = fc_tokens / fc_s
    print(
        f"FastChat loop (HF generate, 1 at a time): {fc_tokens} tokens in {fc_s:.1f}s wall / "
        f"{fc_cpu:.1f}s CPU = {fc_tps:.1f} tokens/s ({fc_tokens / fc_cpu:.1f} tokens per CPU-second)"
    )
    print(
        f"speed-up: {ours_tps / fc_tps:.2f}x tokens/s wall, "
        f"{(ours_tokens / ours_cpu) / (fc_tokens / fc_cpu):.2f}x per CPU-second (target >= 4x)"
    )

    ref = unbatched_greedy(engine, greedy_q, args.max_new_tokens)
    pairs = [(q["question_id"], t) for q in greedy_q for t in range(2)]
    same_ours = sum(ours_answers[i][t] == ref[i][t] for i, t in pairs)
    same_hf = sum(ours_answers[i][t] == fc_answers[i][t] for i, t in pairs)
    print(
        f"temperature-0 turns identical to unbatched greedy (our engine, 1 at a time): "
        f"{same_ours}/{len(pairs)} = {same_ours / len(pairs):.0%} (target >= 95%)"
    )
    print(
        f"temperature-0 turns identical to HF generate greedy (FastChat loop): "
        f"{same_hf}/{len(pairs)} = {same_hf / len(pairs):.0%}"
    )


if __name__ == "__main__":
    main()
