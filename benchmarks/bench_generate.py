"""MT-bench answer generation: arenaflow's batched engine vs FastChat's one-question-at-a-time loop.

    .venv/bin/python benchmarks/bench_generate.py [--questions 16] [--max-new-tokens 128] [--batch-size 16]

Both sides answer the same MT-bench questions (two turns, turn 2 sees the model's own turn 1) with
SmolLM2-135M-Instruct, the same chat template and the MT-bench paper's per-category temperatures.
The peer reproduces FastChat 0.2.36 `gen_model_answer.get_model_answers`: for each question, for
each turn, `model.generate(do_sample=temperature > 1e-4, temperature, max_new_tokens)` on one prompt.
(FastChat's own function cannot run here: it loads models with `device="cuda"` hard-coded and picks a
conversation template by model name, which for this checkpoint is not the model's own template.)
Prints tokens/s of both, the speed-up, and the share of temperature-0 turns identical to unbatched
greedy decoding.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
