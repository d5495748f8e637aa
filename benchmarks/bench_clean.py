"""Cleaning throughput: arenaflow's ShareGPT cleaner vs FastChat's own, same input, same machine.

    .venv/bin/python benchmarks/bench_clean.py [--workers 2] [--limit N] [--workdir DIR]

Input: every complete record of the packaged ShareGPT file (17,671), written once as JSONL by our
loader (FastChat's `json.load` cannot read the cut-off file). The peer, FastChat 0.2.36's
`clean_html_one_sample` + its dedup pass, runs in its own venv `.venv-bench` (created and
installed here on first use: fschat --no-deps, markdownify==0.11.6, beautifulsoup4, tqdm).
Ours runs twice: with the default config (all rules, MinHash/LSH) for throughput, and with only
the FastChat-comparable rules for the kept-id agreement.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from arenaflow.config import REPO_ROOT, compose_config
from arenaflow.data.clean import CleanOptions, clean_file
from arenaflow.data.load import load_raw

BENCH_VENV = REPO_ROOT / ".venv-bench"
PEER = Path(__file__).with_name("_fastchat_clean_peer.py")
PEER_PACKAGES = ["fschat==0.2.36", "markdownify==0.11.6", "beautifulsoup4", "tqdm"]


def bench_python() -> Path:
    """The benchmark venv's python, creating the venv and installing FastChat's cleaner if needed."""
    py = BENCH_VENV / "bin" / "python"
    probe = "import fastchat.data.clean_sharegpt"
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"creating {BENCH_VENV} with {' '.join(PEER_PACKAGES)}", flush=True)
    subprocess.run(["python3", "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--no-deps", "fschat==0.2.36"], check=True)
    subprocess.run([*pip, *PEER_PACKAGES[1:]], check=True)
    return py


def cpu_seconds() -> float:
    """User+system CPU of this process and its reaped descendants (robust to a busy machine)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_peer(raw: Path, workers: int) -> dict:
    py = bench_python()
    cpu0 = cpu_seconds()
    out = subprocess.run(
        [str(py), str(PEER), str(raw), str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_seconds"] = cpu_seconds() - cpu0  # includes its JSON load (not timed in wall)
    return result


def run_ours(raw: Path, out: Path, opts: CleanOptions, workers: int) -> tuple[dict, float, set]:
    cpu0, start = cpu_seconds(), time.perf_counter()
    stats = clean_file(str(raw), str(out), opts, num_workers=workers, chunk_size=256)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    with out.open(encoding="utf-8") as f:
        ids = {json.loads(line)["id"] for line in f if line.strip()}
    return {**stats.as_dict(), "cpu_seconds": cpu}, seconds, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-clean-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "sharegpt_raw.jsonl"
    t0 = time.perf_counter()
    raw_stats = load_raw("package", str(raw), limit=args.limit)
    load_s = time.perf_counter() - t0
    n = raw_stats.kept
    print(
        f"input: {n} records ({load_s:.1f} s to stream-parse; truncated={raw_stats.stream.truncated})"
    )

    defaults = CleanOptions.from_cfg(compose_config().data)
    comparable = replace(defaults, minhash=False, wrong_list_filter=False, blocked_responses=())

    peer = run_peer(raw, args.workers)
    ours_full, full_s, _ = run_ours(raw, work / "clean_full.jsonl", defaults, args.workers)
    ours_cmp, cmp_s, ours_ids = run_ours(raw, work / "clean_cmp.jsonl", comparable, args.workers)

    peer_ids = set(peer["kept_ids"])
    union = peer_ids | ours_ids
    agreement = len(peer_ids & ours_ids) / len(union) if union else 1.0
    rows = [
        ("FastChat clean_sharegpt", peer["seconds"], peer, len(peer_ids)),
        ("arenaflow (all rules + MinHash)", full_s, ours_full, ours_full["kept"]),
        ("arenaflow (FastChat rules)", cmp_s, ours_cmp, ours_cmp["kept"]),
    ]
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"\n{'cleaner':34} {'wall s':>7} {'records/s':>10} {'cpu s':>7} {'rec/cpu-s':>10} {'kept':>7}"
    )
    for name, secs, r, kept in rows:
        cpu = r["cpu_seconds"]
        print(f"{name:34} {secs:7.1f} {n / secs:10.0f} {cpu:7.1f} {n / cpu:10.0f} {kept:7d}")
    print(f"\nrecords/s speedup (all rules) : {peer['seconds'] / full_s:.1f}x")
    print(f"records/s speedup (same rules): {peer['seconds'] / cmp_s:.1f}x")
    print(f"CPU speedup (all rules)       : {peer['cpu_seconds'] / ours_full['cpu_seconds']:.1f}x")
    print(
        f"kept-id agreement on FastChat-comparable rules: {agreement:.4f} "
        f"(both {len(peer_ids & ours_ids)}, only FastChat {len(peer_ids - ours_ids)}, "
        f"only ours {len(ours_ids - peer_ids)})"
    )
    for name, _, r, _ in rows:
        print(f"dropped by {name}: {dict(sorted(r['dropped'].items()))}")
    result = {
        "records": n,
        "workers": args.workers,
        "fastchat": {k: v for k, v in peer.items() if k != "kept_ids"},
        "ours_full": {"seconds": full_s, **ours_full},
        "ours_comparable": {"seconds": cmp_s, **ours_cmp},
        "agreement": agreement,
        "only_fastchat": sorted(peer_ids - ours_ids)[:50],
        "only_ours": sorted(ours_ids - peer_ids)[:50],
    }
    (work / "bench_clean.json").write_text(json.dumps(result, indent=2))
    print(f"\ndetails: {work / 'bench_clean.json'}")


if __name__ == "__main__":
    main()
