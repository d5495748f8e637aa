"""Serving throughput and latency: 64 MT-bench chat requests at concurrency 1 and 16 against a real server.

    .venv/bin/python benchmarks/bench_serve.py [--requests 64] [--max-tokens 64] [hydra overrides]

Starts `python -m arenaflow.serve` (SmolLM2-135M-Instruct by default) on a free port, streams every
request through the official `openai` client (max_tokens 64, greedy) and prints generated tokens/s,
p50/p99 latency and time to first token, each run free and under a JSON schema (`response_format`,
constrained decoding). Targets: throughput at 16 >= 4x throughput at 1; the schema costs <= 10%.
Each concurrency runs free, schema, schema, free and sums per mode, so a drift in the machine's load
cancels out; tokens per CPU-second of the server process are printed too: on a shared machine they
compare the two modes where wall-clock tokens/s mostly measures the neighbours (there, run it with
OMP_NUM_THREADS=1: oversubscribed torch threads made each decode step ~10x slower).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from openai import AsyncOpenAI

from arenaflow.config import compose_config
from arenaflow.evaluate.questions import load_questions, question_source
from arenaflow.models import resolve_model

CONCURRENCY = (1, 16)
# an answer string the model must fill until max_tokens (it cannot close it earlier), so both modes
# generate as many tokens and a step costs the same rows in each
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "confidence": {"type": "integer", "minimum": 1, "maximum": 10},
        "answer": {"type": "string", "minLength": 1000},  # longer than max_tokens can write
    },
    "required": ["confidence", "answer"],
    "additionalProperties": False,
}
MODES = {
    "free": None,
    "schema": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(
    client: AsyncOpenAI, model: str, question: str, max_tokens: int, response_format: dict | None
) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **({"response_format": response_format} if response_format else {}),
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return latency, ttft if ttft is not None else latency, tokens


async def load(
    url: str, model: str, questions: list[str], concurrency: int, max_tokens: int, mode: str
) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600) as client:

        async def gated(q: str) -> tuple[float, float, int]:
            async with gate:
                return await one(client, model, q, max_tokens, MODES[mode])

        t0 = time.perf_counter()
        results = await asyncio.gather(*(gated(q) for q in questions))
        wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    ttft = np.array([r[1] for r in results])
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "mode": mode,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "p50_latency_s": float(np.percentile(lat, 50)),
        "p99_latency_s": float(np.percentile(lat, 99)),
        "p50_ttft_s": float(np.percentile(ttft, 50)),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args, overrides = parser.parse_known_args(argv)
    cfg = compose_config(["model=smollm2_135m", "tracking=none", *overrides])
    checkpoint = resolve_model(cfg.model, cfg.paths.cache_dir)
    questions, _ = load_questions(question_source(cfg))
    prompts = [q["turns"][0] for q in questions][: args.requests]
    prompts += prompts[: args.requests - len(prompts)]
    port = free_port()
    cmd = [
        sys.executable, "-m", "arenaflow.serve", *overrides, "tracking=none",
        f"serve.model_uri={checkpoint}", f"serve.port={port}", "serve.log_level=warning",
        f"serve.max_batch_size={max(CONCURRENCY)}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                print(f"server exited with code {proc.returncode}", file=sys.stderr)
                return 1
            try:
                ready = httpx.get(f"{base}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                print("server not ready after 300 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        model = str(cfg.serve.served_model_name)
        for mode in MODES:  # warm-up (the schema's grammar compiles here)
            asyncio.run(load(f"{base}/v1", model, prompts[:2], 2, 4, mode))
        server = psutil.Process(proc.pid)
        rows = [  # free, schema, schema, free: a drift in the machine's load cancels out
            with_cpu(server, load(f"{base}/v1", model, prompts, c, args.max_tokens, mode))
            for c in CONCURRENCY
            for mode in ("free", "schema", "schema", "free")
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(
        f"\nserving {Path(checkpoint).name}: {len(prompts)} MT-bench chat requests, "
        f"max_tokens {args.max_tokens}, greedy, streamed"
    )
    report(rows)
    return 0


def with_cpu(server: psutil.Process, run: Any) -> dict[str, float]:
    """A load's row plus the server's tokens per CPU-second (user + system) while it ran."""
    before = sum(server.cpu_times()[:2])
    row = asyncio.run(run)
    row["cpu_s"] = max(sum(server.cpu_times()[:2]) - before, 1e-9)
    row["tok_per_cpu_s"] = row["tokens"] / row["cpu_s"]
    return row


def report(rows: list[dict]) -> None:
    print(
        f"{'conc':>4} {'mode':>6} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>9} {'p99 ttft':>9} {'tok/cpu-s':>9}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>4} {r['mode']:>6} {r['tokens']:>7} {r['wall_s']:>7.1f} {r['tok_per_s']:>7.1f} "
            f"{r['p50_latency_s']:>8.2f} {r['p99_latency_s']:>8.2f} {r['p50_ttft_s']:>9.3f} {r['p99_ttft_s']:>9.3f} {r['tok_per_cpu_s']:>9.1f}"
        )
    tokens, wall, cpu_s = {}, {}, {}  # summed over a mode's runs at one concurrency
    for r in rows:
        key = r["concurrency"], r["mode"]
        tokens[key] = tokens.get(key, 0) + r["tokens"]
        wall[key] = wall.get(key, 0.0) + r["wall_s"]
        cpu_s[key] = cpu_s.get(key, 0.0) + r["cpu_s"]
    tps = {k: tokens[k] / wall[k] for k in tokens}
    cpu = {k: tokens[k] / cpu_s[k] for k in tokens}
    speedup = tps[CONCURRENCY[-1], "free"] / tps[CONCURRENCY[0], "free"]
    verdict = "meets" if speedup >= 4 else "misses"
    print(
        f"throughput at {CONCURRENCY[-1]} / at {CONCURRENCY[0]}: {speedup:.2f}x ({verdict} the 4x target)"
    )
    for c in CONCURRENCY:
        ratio, cpu_ratio = tps[c, "schema"] / tps[c, "free"], cpu[c, "schema"] / cpu[c, "free"]
        verdict = "meets" if cpu_ratio >= 0.9 else "misses"
        print(
            f"concurrency {c}: JSON schema / free throughput {ratio:.2f} (wall), "
            f"{cpu_ratio:.2f} (per server CPU-second; {verdict} the <= 10% cost target)"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
