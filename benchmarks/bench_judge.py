"""How good a judge is SmolLM2-135M-Instruct (the offline default)? Judge health on real MT-bench items.

    .venv/bin/python benchmarks/bench_judge.py [--questions 101 111 121] [--max-tokens 256] \
        [hydra overrides: experiment=demo judge.structured=true ...]

Two competitors answer MT-bench math/reasoning/coding questions: `gpt-4` with GPT-4's reference
answers (strong) and `idk` with "I don't know." (useless). The local judge grades both (single) and
compares them in both orders (pairwise). A judge worth anything scores gpt-4 above idk and prefers
it in both orders. Prints calls/s, the text parse-failure rate, how many verdicts logprobs
recovered, position consistency and the scores; a second run shows the cache (zero calls).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from arenaflow import io
from arenaflow.config import compose_config
from arenaflow.judge import judge, score
from arenaflow.judge.prompts import load_reference_answers, package_data_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, nargs="+", default=[101, 111, 121])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. judge.structured=true")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-judge-"))
    cfg = compose_config(
        [
            f"paths.home={home}",
            "paths.cache_dir=.arenaflow/cache",
            "tracking=none",
            f"judge.max_tokens={args.max_tokens}",
            *args.overrides,
        ]
    )
    wanted = set(args.questions)
    questions = [
        q
        for q in io.read_jsonl(io.join(package_data_dir(), "mt_bench", "question.jsonl"))
        if q["question_id"] in wanted
    ]
    refs = load_reference_answers("package")
    io.write_jsonl(str(home / "q.jsonl"), questions)
    answers = {
        "gpt-4": [refs[q["question_id"]] for q in questions],
        "idk": [["I don't know.", "I don't know."] for _ in questions],
    }
    uris = {}
    for name, turns in answers.items():
        uris[name] = str(home / f"{name}.jsonl")
        io.write_jsonl(
            uris[name],
            [
                {"question_id": q["question_id"], "model_id": name, "choices": [{"turns": t}]}
                for q, t in zip(questions, turns, strict=True)
            ],
        )
    for attempt in ("first run", "cached re-run"):
        t0 = time.perf_counter()
        out = judge(cfg, question_uri=str(home / "q.jsonl"), answer_uris=uris)
        dt = time.perf_counter() - t0
        c, h = out["counts"], out["health"]
        print(f"== {attempt}: {dt:.1f}s, {c['calls_made']} calls, {c['calls_cached']} cached")
        if c["calls_made"]:
            print(
                f"   {c['calls_made'] / dt:.2f} calls/s, {c['completion_tokens']} tokens generated"
            )
    s = score(cfg, single_uri=out["single_uri"], pair_uri=out["pair_uri"])
    print(f"parse-failure rate (text): {h['parse_failure_rate']:.1%} of {h['replies']} replies")
    print(f"recovered from logprobs: {h['recovered_by_logprobs']}, unresolved: {h['unresolved']}")
    print(f"position consistency: {h['position_consistency']}")
    print(f"length bias (r): {h['length_bias']}")
    print(f"text parse failures by reason: {out['parse_errors']}")
    print(f"calibration: {out['calibration']['figures']}")
    for model, sc in s["scores"].items():
        print(f"score {model}: {sc}")
    for model, pw in s["pairwise"].items():
        print(f"pairwise {model}: {pw}")


if __name__ == "__main__":
    main()
