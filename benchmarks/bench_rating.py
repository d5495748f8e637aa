"""Bootstrap Bradley–Terry: arenaflow vs FastChat 0.2.36, and arenaflow alone at Arena scale.

    .venv/bin/python benchmarks/bench_rating.py            # both parts
    .venv/bin/python benchmarks/bench_rating.py --part b   # ours at 1M battles only

(a) Synthetic battles with known strengths (ties included), 50,000 battles / 20 models / 100
    rounds: FastChat's `get_bootstrap_result(battles, compute_elo_mle_with_tie, 100)` (row
    resampling + one sklearn LogisticRegression per round) runs in its own environment,
    `.venv-bench`, on the same battles file, in a subprocess; ours is `compute_bootstrap_bt`.
    Prints both times, the ratio, and the largest difference between the two point estimates.
(b) Ours alone: 1,000,000 battles / 100 models / 1,000 rounds; time and Spearman correlation of
    the bootstrap medians with the true strengths.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    args = parser.parse_args()
    if args.part in ("a", "all"):
        part_a()
    if args.part in ("b", "all"):
        part_b()


if __name__ == "__main__":
    main()
