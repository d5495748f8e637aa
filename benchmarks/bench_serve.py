"""Serving throughput and latency: 64 MT-bench chat requests at concurrency 1 and 16 against a real server.

    .venv/bin/python benchmarks/bench_serve.py [--requests 64] [--max-tokens 64] [hydra overrides]

Starts `python -m arenaflow.serve` (SmolLM2-135M-Instruct by default) on a free port, streams every
request through the official `openai` client (max_tokens 64, greedy) and prints generated tokens/s,
p50/p99 latency and time to first token. Target: throughput at 16 >= 4x throughput at 1.
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

import httpx
import numpy as np
from openai import AsyncOpenAI

from arenaflow.config import compose_config
from arenaflow.evaluate.questions import load_questions, question_source
from arenaflow.models import resolve_model

CONCURRENCY = (1, 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(
    client: AsyncOpenAI, model: str, question: str, max_tokens: int
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
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return latency, ttft if ttft is not None else latency, tokens


async def load(
    url: str, model: str, questions: list[str], concurrency: int, max_tokens: int
) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600) as client:

        async def gated(q: str) -> tuple[float, float, int]:
            async with gate:
                return await one(client, model, q, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(gated(q) for q in questions))
        wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    ttft = np.array([r[1] for r in results])
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
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
        asyncio.run(load(f"{base}/v1", model, prompts[:2], 2, 4))  # warm-up
        rows = [
            asyncio.run(load(f"{base}/v1", model, prompts, c, args.max_tokens)) for c in CONCURRENCY
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(
        f"\nserving {Path(checkpoint).name}: {len(prompts)} MT-bench chat requests, "
        f"max_tokens {args.max_tokens}, greedy, streamed"
    )
    print(
        f"{'conc':>4} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>9} {'p99 ttft':>9}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>4} {r['tokens']:>7} {r['wall_s']:>7.1f} {r['tok_per_s']:>7.1f} "
            f"{r['p50_latency_s']:>8.2f} {r['p99_latency_s']:>8.2f} {r['p50_ttft_s']:>9.3f} {r['p99_ttft_s']:>9.3f}"
        )
    speedup = rows[-1]["tok_per_s"] / rows[0]["tok_per_s"]
    verdict = "meets" if speedup >= 4 else "misses"
    print(
        f"throughput at {CONCURRENCY[-1]} / at {CONCURRENCY[0]}: {speedup:.2f}x ({verdict} the 4x target)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
