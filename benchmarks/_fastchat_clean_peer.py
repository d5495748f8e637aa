"""FastChat's own ShareGPT cleaner, run inside the benchmark venv (.venv-bench) by bench_clean.py.

Runs `fastchat.data.clean_sharegpt.clean_html_one_sample` over JSONL records with N processes
(as FastChat's clean_html_all does, minus its per-record prints), skipping records it crashes on,
then FastChat's own dedup pass. Prints one JSON object: timing, counts and the kept ids.
"""

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from fastchat.data.clean_sharegpt import clean_html_one_sample

REASONS = {1: "too_short", 2: "wrong_format", 3: "blocked_words", 4: "parse_error", -1: "crashed"}


def safe_clean(sample):
    try:
        return clean_html_one_sample(sample)
    except Exception:  # FastChat's cleaner dies on some records (e.g. RecursionError)
        return sample, -1


def main(in_path: str, workers: int) -> None:
    with open(in_path, encoding="utf-8") as f:
        content = [json.loads(line) for line in f if line.strip()]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as ex:
        processed = list(ex.map(safe_clean, content))
    visited, kept, counts = {}, [], {}
    for sample, code in processed:
        cid = sample["id"]
        if code != 0:
            reason = REASONS[code]
        elif cid in visited:
            reason = "duplicate_id"
        elif sample.get("plugins", None) is not None:
            reason = "plugins"
        else:
            key = (sample["conversations"][0]["value"], sample["conversations"][1]["value"])
            if key in visited:
                reason = "duplicate_value"
            else:
                visited[cid] = visited[key] = cid
                kept.append(cid)
                continue
        counts[reason] = counts.get(reason, 0) + 1
    seconds = time.perf_counter() - start
    print(
        json.dumps({"input": len(content), "seconds": seconds, "dropped": counts, "kept_ids": kept})
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
