"""Bootstrap Bradley–Terry: arenaflow vs FastChat 0.2.36, arenaflow alone at Arena scale, and
style control vs FastChat's newest rating code.

    .venv/bin/python benchmarks/bench_rating.py            # parts a and b
    .venv/bin/python benchmarks/bench_rating.py --part b   # ours at 1M battles only
    .venv/bin/python benchmarks/bench_rating.py --part c --fastchat-git /path/to/FastChat

(a) Synthetic battles with known strengths (ties included), 50,000 battles / 20 models / 100
    rounds: FastChat's `get_bootstrap_result(battles, compute_elo_mle_with_tie, 100)` (row
    resampling + one sklearn LogisticRegression per round) runs in its own environment,
    `.venv-bench`, on the same battles file, in a subprocess; ours is `compute_bootstrap_bt`.
    Prints both times, the ratio, and the largest difference between the two point estimates.
(b) Ours alone: 1,000,000 battles / 100 models / 1,000 rounds; time and Spearman correlation of
    the bootstrap medians with the true strengths.

(c) Style control on synthetic battles whose judge also rewards length (20,000 battles, 20 models,
    200 rounds): FastChat's `compute_style_control` / `compute_bootstrap_style_control` from
    `fastchat/serve/monitor/rating_systems.py` (not in any fschat release on PyPI: read at run time
    from a FastChat git checkout, `--fastchat-git` or $FASTCHAT_GIT; it needs only numpy, scipy,
    pandas and tqdm) against `compute_style_bt` / `compute_bootstrap_style_bt`: point difference
    (target < 1 rating point), CI-width ratio (target within 10%), coefficient difference, speed.

`.venv-bench` is created when missing: fschat==0.2.36 with --no-deps plus what
`fastchat.serve.monitor.elo_analysis` imports. That import chain reaches torch and transformers
(through fastchat.model); rather than installing a second torch, the bench environment sees the
project's `.venv` packages through a .pth file added after its own installs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from arenaflow.rating import compute_bootstrap_bt, compute_bt

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
PEER_DEPS = ["pandas", "numpy", "scikit-learn", "plotly", "tqdm", "pytz", "psutil", "requests"]

PEER_SCRIPT = """
import json, sys, time
import pandas as pd
from fastchat.serve.monitor.elo_analysis import compute_elo_mle_with_tie, get_bootstrap_result
battles = pd.read_json(sys.argv[1], lines=True)
rounds = int(sys.argv[2])
t0 = time.perf_counter()
point = compute_elo_mle_with_tie(battles)
t1 = time.perf_counter()
boot = get_bootstrap_result(battles, compute_elo_mle_with_tie, rounds)
t2 = time.perf_counter()
print(json.dumps({"point_s": t1 - t0, "bootstrap_s": t2 - t1, "point": point.to_dict(),
                  "median": boot.median().to_dict()}))
"""


def ensure_bench_venv() -> Path:
    """The peer's environment: fschat 0.2.36 (--no-deps) and its elo_analysis imports."""
    python = BENCH_VENV / "bin" / "python"
    probe = [str(python), "-c", "import fastchat.serve.monitor.elo_analysis"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PEER_DEPS], check=True)
    subprocess.run([*pip, "--no-deps", "fschat==0.2.36"], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # torch / transformers / accelerate for fastchat.model's imports, from the project's .venv.
    (Path(site) / "zz_arenaflow_venv.pth").write_text(ours + "\n")
    subprocess.run(probe, check=True)
    return python


def synthetic(n: int, m: int, tie_rate: float, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    """Battles between random pairs with true ratings ~ N(1000, 200), ties at `tie_rate`."""
    rng = np.random.default_rng(seed)
    truth = pd.Series(rng.normal(1000, 200, m), index=[f"model_{i:03d}" for i in range(m)])
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    t = truth.to_numpy()
    p = 1 / (1 + 10 ** ((t[b] - t[a]) / 400))
    tie = rng.random(n) < tie_rate
    winner = np.where(tie, "tie", np.where(rng.random(n) < p, "model_a", "model_b"))
    names = truth.index.to_numpy()
    return pd.DataFrame({"model_a": names[a], "model_b": names[b], "winner": winner}), truth


def part_a(rounds: int = 100) -> None:
    battles, truth = synthetic(50_000, 20, 0.1, seed=0)
    python = ensure_bench_venv()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "battles.jsonl"
        battles.to_json(path, orient="records", lines=True)
        proc = subprocess.run(
            [str(python), "-c", PEER_SCRIPT, str(path), str(rounds)],
            capture_output=True,
            text=True,
            check=True,
        )
    peer = json.loads(proc.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    point = compute_bt(battles)
    t1 = time.perf_counter()
    boot = compute_bootstrap_bt(battles, num_round=rounds, seed=0)
    t2 = time.perf_counter()
    peer_point = pd.Series(peer["point"])
    diff = (point - peer_point[point.index]).abs().max()
    med_diff = (boot.median() - pd.Series(peer["median"])[boot.columns]).abs().max()
    print("(a) 50,000 battles, 20 models, 10% ties, 100 bootstrap rounds")
    print(
        f"    fschat 0.2.36 bootstrap : {peer['bootstrap_s']:8.2f} s  (point fit {peer['point_s']:.3f} s)"
    )
    print(f"    arenaflow bootstrap     : {t2 - t1:8.3f} s  (point fit {t1 - t0:.3f} s)")
    print(
        f"    speed-up                : {peer['bootstrap_s'] / (t2 - t1):8.0f} x   (target >= 100x)"
    )
    print(f"    max |point diff|        : {diff:8.4f} rating points (target < 0.5)")
    print(f"    max |median diff|       : {med_diff:8.2f} rating points (different resamples)")
    rho = spearmanr(point[truth.index], truth).statistic
    print(f"    Spearman(point, truth)  : {rho:8.4f}")


def part_b(rounds: int = 1000) -> None:
    battles, truth = synthetic(1_000_000, 100, 0.1, seed=1)
    t0 = time.perf_counter()
    boot = compute_bootstrap_bt(battles, num_round=rounds, seed=0)
    elapsed = time.perf_counter() - t0
    rho = spearmanr(boot.median()[truth.index], truth).statistic
    width = (boot.quantile(0.975) - boot.quantile(0.025)).median()
    print("(b) 1,000,000 battles, 100 models, 10% ties, 1,000 bootstrap rounds (arenaflow)")
    print(f"    time                    : {elapsed:8.2f} s   (target < 10 s)")
    print(f"    Spearman(median, truth) : {rho:8.4f}")
    print(f"    median 95% CI width     : {width:8.2f} rating points")


def style_battles(n: int, m: int, seed: int, length_coef: float) -> pd.DataFrame:
    """Battles decided by strength plus the judge's taste for length, with FastChat conv_metadata."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 0.5, m)
    a = rng.integers(0, m, n)
    b = (a + rng.integers(1, m, n)) % m
    verbosity = rng.uniform(100, 900, m)
    tok_a = (verbosity[a] * rng.uniform(0.5, 1.5, n)).astype(int)
    tok_b = (verbosity[b] * rng.uniform(0.5, 1.5, n)).astype(int)
    diff = (tok_a - tok_b) / (tok_a + tok_b + 1)
    z = np.log(10) * (truth[a] - truth[b]) + length_coef * (diff - diff.mean()) / diff.std()
    tie = rng.random(n) < 0.1
    winner = np.where(
        tie, "tie", np.where(rng.random(n) < 1 / (1 + np.exp(-z)), "model_a", "model_b")
    )
    counts = {k: rng.poisson(lam, (2, n)) for k, lam in (("h", 1), ("l", 3), ("b", 2))}
    meta = [
        {
            "sum_assistant_a_tokens": int(tok_a[i]),
            "header_count_a": {"h1": int(counts["h"][0, i])},
            "list_count_a": {"ordered": int(counts["l"][0, i])},
            "bold_count_a": {"**": int(counts["b"][0, i])},
            "sum_assistant_b_tokens": int(tok_b[i]),
            "header_count_b": {"h1": int(counts["h"][1, i])},
            "list_count_b": {"ordered": int(counts["l"][1, i])},
            "bold_count_b": {"**": int(counts["b"][1, i])},
        }
        for i in range(n)
    ]
    names = np.array([f"model_{i:03d}" for i in range(m)])
    return pd.DataFrame(
        {"model_a": names[a], "model_b": names[b], "winner": winner, "conv_metadata": meta}
    )


def load_fastchat_rating_systems(git_dir: str) -> Any:
    """FastChat's newest rating_systems.py, read from its git checkout into a temporary module."""
    import importlib.util

    source = subprocess.run(
        ["git", "-C", git_dir, "show", "HEAD:fastchat/serve/monitor/rating_systems.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "fastchat_rating_systems.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fastchat_rating_systems", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its pool workers pickle functions by module name
    spec.loader.exec_module(module)
    return module


def part_c(git_dir: str, rounds: int = 200) -> None:
    from arenaflow.rating.style import compute_bootstrap_style_bt, compute_style_bt

    fc = load_fastchat_rating_systems(git_dir)
    battles = style_battles(20_000, 20, seed=2, length_coef=0.8)
    t0 = time.perf_counter()
    fc_point, fc_coef = fc.compute_style_control(battles)
    t1 = time.perf_counter()
    fc_boot, _ = fc.compute_bootstrap_style_control(battles, rounds)
    t2 = time.perf_counter()
    ours = compute_style_bt(battles)
    t3 = time.perf_counter()
    boot, coefs = compute_bootstrap_style_bt(battles, rounds, seed=0)
    t4 = time.perf_counter()
    models = ours.ratings.index
    point_diff = (ours.ratings - fc_point[models]).abs().max()
    coef_diff = np.abs(np.array(list(ours.coefficients.values())) - fc_coef).max()
    width = lambda df: df.quantile(0.975) - df.quantile(0.025)  # noqa: E731
    ratio = width(boot)[models] / width(fc_boot)[models]
    print(f"(c) style control, 20,000 battles, 20 models, 10% ties, {rounds} bootstrap rounds")
    print(f"    FastChat (newest) bootstrap: {t2 - t1:8.2f} s  (point fit {t1 - t0:.3f} s)")
    print(f"    arenaflow bootstrap        : {t4 - t3:8.2f} s  (point fit {t3 - t2:.3f} s)")
    print(f"    speed-up                   : {(t2 - t1) / (t4 - t3):8.1f} x   (target >= 10x)")
    print(f"    max |point diff|           : {point_diff:8.4f} rating points (target < 1)")
    print(f"    max |coefficient diff|     : {coef_diff:8.5f}")
    print(
        f"    95% CI width ours/FastChat : median {ratio.median():.3f}, "
        f"range [{ratio.min():.3f}, {ratio.max():.3f}] (target within 10%)"
    )
    print(f"    fitted length coefficient  : {ours.coefficients['length']:.3f} (simulated 0.8)")
    from arenaflow.rating.sandwich import sandwich_style_intervals

    t5 = time.perf_counter()
    robust, _ = sandwich_style_intervals(battles)
    t6 = time.perf_counter()
    s_ratio = (robust["upper"] - robust["lower"])[models] / width(boot)[models]
    print(
        f"    sandwich intervals         : {t6 - t5:8.2f} s, width / our bootstrap's: median "
        f"{s_ratio.median():.3f}, range [{s_ratio.min():.3f}, {s_ratio.max():.3f}]"
    )


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "c", "all"], default="all")
    parser.add_argument("--fastchat-git", default=os.environ.get("FASTCHAT_GIT"))
    parser.add_argument("--rounds", type=int, default=200, help="bootstrap rounds of part c")
    args = parser.parse_args()
    if args.part in ("a", "all"):
        part_a()
    if args.part in ("b", "all"):
        part_b()
    if args.part == "c" or (args.part == "all" and args.fastchat_git):
        if not args.fastchat_git:
            raise SystemExit("part c needs a FastChat git checkout: --fastchat-git DIR")
        part_c(args.fastchat_git, args.rounds)


if __name__ == "__main__":
    main()
