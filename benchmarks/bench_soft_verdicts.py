"""Do the judge's verdict probabilities separate models better than its argmax verdicts?

    .venv/bin/python benchmarks/bench_soft_verdicts.py [--home .arenaflow] [overrides ...]

Reads the judgment files a `make run` wrote (single, pairwise, calibration; the judge records
`expected_score` and the A/B/C probabilities beside each verdict where its backend returns token
probabilities) and prints, side by side, hard (argmax) against soft (probabilities):

- MT-bench: each model's average (argmax score vs expected score) and the paired t statistic of
  the per-turn differences between the first two competitors;
- pairwise battles: the share of tied battles, and the paired bootstrap interval of
  rating(a) - rating(b) from a Bradley–Terry fit on hard outcomes (swap rule, ties halved) vs soft
  outcomes (each battle's expected score for model_a: P(win) + P(tie)/2 averaged over both orders,
  resampling battles jointly as the hard bootstrap does);
- calibration on known answers: single separation, pairwise accuracy and tie rate, hard vs soft.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from arenaflow import io
from arenaflow.config import compose_config
from arenaflow.judge.stage import calibration_uris, judgment_uris
from arenaflow.rating.battles import battles_from_pairwise, expected_first
from arenaflow.rating.ratings import compute_bootstrap_bt, compute_bt, paired_differences

ROUNDS, SEED = 1000, 42


def t_stat(diffs: list[float]) -> float | None:
    if len(diffs) < 2 or np.std(diffs, ddof=1) == 0:
        return None
    return float(np.mean(diffs) / (np.std(diffs, ddof=1) / math.sqrt(len(diffs))))


def mt_bench(singles: list[dict]) -> None:
    rows = [r for r in singles if r["score"] not in (None, -1)]
    with_p = [r for r in rows if r.get("expected_score") is not None]
    print(f"single gradings: {len(rows)} scored, {len(with_p)} with probabilities")
    models = list(dict.fromkeys(r["model"] for r in rows))
    for m in models:
        hard = [r["score"] for r in with_p if r["model"] == m]
        soft = [r["expected_score"] for r in with_p if r["model"] == m]
        if hard:
            print(f"  {m:<12} argmax {np.mean(hard):5.2f}   expected {np.mean(soft):5.2f}")
    if len(models) >= 2:
        a, b = models[:2]
        by = {(r["question_id"], r["turn"], r["model"]): r for r in with_p}
        keys = [(q, t) for (q, t, m) in by if m == a and (q, t, b) in by]
        hard = [by[(*k, a)]["score"] - by[(*k, b)]["score"] for k in keys]
        soft = [by[(*k, a)]["expected_score"] - by[(*k, b)]["expected_score"] for k in keys]
        print(
            f"  {a} - {b} over {len(keys)} turns: ties {sum(d == 0 for d in hard)} argmax vs "
            f"{sum(abs(d) < 0.1 for d in soft)} expected (|diff| < 0.1); paired t "
            f"{_f(t_stat(hard))} argmax vs {_f(t_stat(soft))} expected"
        )


def battles(pairs: list[dict]) -> None:
    df = pd.DataFrame(list(battles_from_pairwise(pairs)))
    if "score_a" not in df.columns:
        print(f"pairwise battles: {len(df)}, none with probabilities in both orders")
        return
    soft = df.dropna(subset=["score_a"]).reset_index(drop=True)
    print(f"pairwise battles: {len(df)}, {len(soft)} with probabilities in both orders")
    if soft.empty:
        return
    models = sorted(set(soft["model_a"]) | set(soft["model_b"]))
    a, b = models[0], models[-1]
    ties_soft = int((soft["score_a"].sub(0.5).abs() < 0.05).sum())
    print(
        f"  tied battles: {int(soft['winner'].str.startswith('tie').sum())} hard vs {ties_soft} "
        "soft (|score - 0.5| < 0.05)"
    )
    for name, use in (("hard", False), ("soft", True)):
        point = compute_bt(soft, anchor=(b, 1000), soft=use)
        boot = compute_bootstrap_bt(soft, ROUNDS, SEED, anchor=(b, 1000), soft=use)
        d = paired_differences(boot, point)[a][b]
        print(
            f"  {name}: {a} - {b} = {d['diff']:+7.1f} [{d['lower']:+7.1f}, {d['upper']:+7.1f}] "
            f"width {d['upper'] - d['lower']:6.1f}, P({a} better) {d['p_better']:.2f}"
        )


def calibration(rows: list[dict]) -> None:
    singles = [r for r in rows if r["kind"] == "single" and r.get("expected_score") is not None]
    pairs = [r for r in rows if r["kind"] == "pair" and r.get("probs")]
    print(f"calibration: {len(singles)} gradings and {len(pairs)} comparisons with probabilities")
    for label, key in (("argmax", "score"), ("expected", "expected_score")):
        strong = [r[key] for r in singles if r["answer"] == "reference"]
        null = [r[key] for r in singles if r["answer"] != "reference"]
        if strong and null:
            print(f"  single separation ({label}): {np.mean(strong) - np.mean(null):+.2f}")
    if pairs:
        hard = np.mean([r["winner"] == r["strong_as"] for r in pairs])
        soft = np.mean([expected_first(r["probs"], r["strong_as"]) for r in pairs])
        ties = np.mean([r["winner"] == "tie" for r in pairs])
        soft_ties = np.mean([r["probs"].get("C", 0.0) for r in pairs])
        print(f"  pairwise accuracy: {hard:.2f} argmax vs {soft:.2f} expected")
        print(f"  tie rate: {ties:.2f} argmax vs {soft_ties:.2f} P(tie)")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=".arenaflow")
    ap.add_argument("overrides", nargs="*", default=["experiment=demo"])
    args = ap.parse_args()
    cfg = compose_config([*args.overrides, f"paths.home={Path(args.home).resolve()}"])
    single_uri, pair_uri = judgment_uris(cfg)
    if not io.exists(pair_uri):
        sys.exit(f"no judgments at {pair_uri}: run `make run` first")
    print(f"judge {cfg.judge.model_name}: {pair_uri}")
    mt_bench(list(io.read_jsonl(single_uri)))
    battles(list(io.read_jsonl(pair_uri)))
    records = calibration_uris(cfg)[0]
    if io.exists(records):
        calibration(list(io.read_jsonl(records)))


if __name__ == "__main__":
    main()
