"""Memory of LoRA adapters served on one shared base vs. each adapter as its own merged copy.

    .venv/bin/python benchmarks/bench_adapters.py [--adapters 2] [--rank 16] [hydra overrides]

Makes N LoRA adapters on SmolLM2-135M-Instruct with peft (random weights on every attention and MLP
projection), then, each in a fresh process: `shared` loads them as the server does on the hf engine
(`arenaflow.engine.adapters.load_shared`: one base, N adapters, one batch) and `copies` as N
engines (`Engine.load` of each adapter folder: the base with the adapter merged, one full copy
each); on a CPU with llama.cpp, `llamacpp-shared` loads them as the server does there
(`LlamaCppEngine.group`: the base's f16 GGUF once, each adapter a GGUF LoRA in its own context) and
`llamacpp-copies` as N merged f16 GGUFs. Each answers 16 greedy tokens per adapter; printed:
resident memory growth of the process (psutil RSS, or CUDA memory allocated on GPU) and the
parameter bytes held (llama.cpp: the GGUF files' sizes). The GGUF files are written beforehand, so
their conversion is not measured; llama.cpp's contexts hold 4 rows x 512 tokens of KV each.

Measured here (CPU, fp32, 2 adapters of rank 16): shared RSS +649 MiB (parameters 550 MiB) vs.
copies +1131 MiB (parameters 1026 MiB), 0.57 of the memory; each more adapter adds ~18 MiB, not 513.
On llama.cpp (same adapters, f32 KV cache): llamacpp-shared +568 MiB (files 296 MiB) vs.
llamacpp-copies +789 MiB (files 517 MiB), 0.72: each context keeps its own KV cache and compute
buffers, so sharing saves the weights only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, root: Path, n: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from arenaflow.adapters import ADAPTER_META
    from arenaflow.models import load_model, load_tokenizer, model_identity

    out = []
    for i in range(n):
        torch.manual_seed(i)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False
        )
        folder = root / f"lora-{i}"
        get_peft_model(load_model(base), config).save_pretrained(folder)
        load_tokenizer(base).save_pretrained(folder)
        meta = {"base": str(base), "base_digest": model_identity(str(base), None)}
        (folder / ADAPTER_META).write_text(json.dumps(meta))
        out.append(folder)
    return out


def measure(variant: str, base: str, adapters: list[str], device: str) -> dict:
    """Runs in its own process: memory growth from loading the models and answering once each."""
    import peft  # noqa: F401  (imported before the baseline: only weights and work are measured)
    import psutil
    import torch
    import transformers  # noqa: F401

    from arenaflow.engine import Engine, SamplingParams
    from arenaflow.engine.adapters import load_shared

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    gpu0 = torch.cuda.memory_allocated() if device == "cuda" else 0
    held = None
    if variant.startswith("llamacpp"):
        engines, held = _llamacpp_engines(variant, Path(base), [Path(a) for a in adapters])
    elif variant == "shared":
        _, views = load_shared(
            base, {f"lora-{i}": a for i, a in enumerate(adapters)}, device=device
        )
        engines = list(views.values())
        models = [engines[0].model]
    else:
        engines = [Engine.load(a, device=device) for a in adapters]
        models = [e.model for e in engines]
    params = SamplingParams(max_new_tokens=16)
    for e in engines:
        e.generate([e.render_chat([{"role": "user", "content": "Hi"}])], params)
    if held is None:
        held = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return {
        "variant": variant,
        "rss_growth_bytes": proc.memory_info().rss - rss0,
        "cuda_allocated_bytes": (torch.cuda.memory_allocated() - gpu0)
        if device == "cuda"
        else None,
        "parameter_bytes": held,
    }


LLAMA_OPTIONS = {"max_batch_size": 4, "n_ctx": 512}


def gguf_cache(base: Path) -> Path:
    return base.parent / "bench-adapters-gguf"


def export_ggufs(base: Path, adapters: list[Path]) -> None:
    """The GGUF files the llama.cpp variants load (converted once, cached beside the base)."""
    from arenaflow.export.registry import resolve_gguf, resolve_lora_gguf

    cache = gguf_cache(base)
    resolve_gguf(base, None, cache)
    for a in adapters:
        resolve_gguf(a, None, cache)  # the adapter merged into its base
        resolve_lora_gguf(a, base, cache)


def _llamacpp_engines(variant: str, base: Path, adapters: list[Path]) -> tuple[list, int]:
    from arenaflow.engine.llamacpp import LlamaCppEngine
    from arenaflow.export.registry import resolve_gguf, resolve_lora_gguf

    cache = gguf_cache(base)
    if variant == "llamacpp-shared":
        group = LlamaCppEngine.group(
            base, {a.name: a for a in adapters}, cache_dir=cache, **LLAMA_OPTIONS
        )
        files = [resolve_gguf(base, None, cache)]
        files += [resolve_lora_gguf(a, base, cache) for a in adapters]
        return list(group.values()), sum(f.stat().st_size for f in files)
    from arenaflow.models import load_tokenizer

    files = [resolve_gguf(a, None, cache) for a in adapters]  # each adapter merged, a GGUF each
    engines = [
        LlamaCppEngine(f, load_tokenizer(a), model_id=a.name, **LLAMA_OPTIONS)
        for a, f in zip(adapters, files, strict=True)
    ]
    return engines, sum(f.stat().st_size for f in files)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # variant base adapters...
    args, overrides = ap.parse_known_args()
    if args.measure:
        variant, base, *adapters = args.measure
        print(json.dumps(measure(variant, base, adapters, args.device)))
        return

    from arenaflow.config import compose_config
    from arenaflow.engine.backends import llamacpp_available
    from arenaflow.models import resolve_model

    cfg = compose_config(["model=smollm2_135m", "tracking=none", *overrides])
    base = resolve_model(cfg.model, cfg.paths.cache_dir)
    variants = ["shared", "copies"]
    if args.device == "cpu" and llamacpp_available():
        variants += ["llamacpp-shared", "llamacpp-copies"]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, Path(tmp), args.adapters, args.rank)
        if len(variants) > 2:
            export_ggufs(base, adapters)
        rows = []
        for variant in variants:
            cmd = [sys.executable, __file__, "--device", args.device, "--measure", variant]
            out = subprocess.run(
                [*cmd, str(base), *map(str, adapters)], check=True, capture_output=True, text=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 2**20
    print(f"{args.adapters} adapters (rank {args.rank}) on {cfg.model.name}, {args.device}:")
    for r in rows:
        cuda = r["cuda_allocated_bytes"]
        extra = f", CUDA allocated {cuda / mib:.1f} MiB" if cuda is not None else ""
        print(
            f"  {r['variant']:>15}: RSS +{r['rss_growth_bytes'] / mib:.1f} MiB, parameters "
            f"{r['parameter_bytes'] / mib:.1f} MiB{extra}"
        )
    by = {r["variant"]: r["rss_growth_bytes"] for r in rows}
    for engine in ("", "llamacpp-"):
        if f"{engine}shared" in by:
            ratio = by[f"{engine}shared"] / by[f"{engine}copies"]
            print(f"  {engine}shared / {engine}copies RSS: {ratio:.2f}")


if __name__ == "__main__":
    main()
