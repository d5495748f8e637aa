"""Data stage: load ShareGPT (streaming, truncation-tolerant), clean it, build the SFT dataset.

Three steps, each a function of the config that writes its artifact under `paths.artifact_root`
and logs its counts to MLflow: `run_raw`, `run_clean`, `run_sft`. The Dagster assets call one step
each; `run(cfg)` (the CLI, `python -m arenaflow.data`) runs all three under one parent MLflow run.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from omegaconf import DictConfig

from arenaflow import io
from arenaflow.tracking import Run, Tracker, tracker_from_cfg

log = logging.getLogger(__name__)

RAW_PATH = "data/sharegpt_raw.jsonl"
RAW_STATS_PATH = "data/raw_stats.json"
CLEAN_PATH = "data/sharegpt_clean.jsonl"
CLEAN_STATS_PATH = "data/clean_stats.json"
SFT_PATH = "data/sft_dataset"
SFT_STATS_PATH = "data/sft_stats.json"
SFT_PLOT_PATH = "data/sft_lengths.png"


def _count_metrics(prefix: str, stats: dict[str, Any]) -> dict[str, float]:
    metrics = {
        f"{prefix}.{k}": float(v)
        for k, v in stats.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for k, v in stats.get("dropped", {}).items():
        metrics[f"{prefix}.dropped.{k}"] = float(v)
    return metrics


def _finish(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    result["run_id"] = run.run_id
    result["mlflow_url"] = run.url
    return result


def run_raw(cfg: DictConfig, tracker: Tracker | None = None, *, nested: bool = False) -> dict:
    """Stream `data.source` into `data/sharegpt_raw.jsonl`, counting unusable records by reason."""
    from arenaflow.data.load import load_raw

    tracker = tracker or tracker_from_cfg(cfg)
    out = io.artifact_uri(cfg, RAW_PATH)
    with tracker.start_run("data.sharegpt_raw", cfg, nested=nested) as run:
        stats = load_raw(
            str(cfg.data.source), out, hf_split=cfg.data.hf_split, limit=cfg.data.get("limit")
        ).as_dict()
        io.write_json(io.artifact_uri(cfg, RAW_STATS_PATH), stats)
        run.log_metrics(_count_metrics("raw", stats))
        run.log_dict(stats, "raw_stats.json")
        return _finish(
            run, {"uri": out, "stats_uri": io.artifact_uri(cfg, RAW_STATS_PATH), "counts": stats}
        )


def run_clean(
    cfg: DictConfig,
    tracker: Tracker | None = None,
    *,
    in_uri: str | None = None,
    nested: bool = False,
) -> dict:
    """Clean the raw JSONL into `data/sharegpt_clean.jsonl` + `data/clean_stats.json`."""
    from arenaflow.data.clean import CleanOptions, clean_file

    tracker = tracker or tracker_from_cfg(cfg)
    in_uri = in_uri or io.artifact_uri(cfg, RAW_PATH)
    if not io.exists(in_uri):
        raise FileNotFoundError(
            f"{in_uri} does not exist: materialize sharegpt_raw first "
            "(python -m arenaflow.data, or the sharegpt_raw asset)"
        )
    out = io.artifact_uri(cfg, CLEAN_PATH)
    opts = CleanOptions.from_cfg(cfg.data)
    with tracker.start_run("data.sharegpt_clean", cfg, nested=nested) as run:
        stats = clean_file(
            in_uri,
            out,
            opts,
            num_workers=int(cfg.data.num_workers),
            chunk_size=int(cfg.data.chunk_size),
        ).as_dict()
        io.write_json(io.artifact_uri(cfg, CLEAN_STATS_PATH), stats)
        run.log_metrics(_count_metrics("clean", stats))
        run.log_dict(stats, "clean_stats.json")
        return _finish(
            run,
            {"uri": out, "stats_uri": io.artifact_uri(cfg, CLEAN_STATS_PATH), "counts": stats},
        )


def file_hash(uri: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_sft(
    cfg: DictConfig,
    tracker: Tracker | None = None,
    *,
    in_uri: str | None = None,
    nested: bool = False,
) -> dict:
    """Tokenize the cleaned data with the training model's template into `data/sft_dataset/`.

    `data_hash` changes exactly when the training examples would: cleaned data, tokenizer and
    template, max length, split ratio and seed.
    """
    from arenaflow import plots
    from arenaflow.data.sft import build_sft_dataset
    from arenaflow.models import resolve_model

    tracker = tracker or tracker_from_cfg(cfg)
    in_uri = in_uri or io.artifact_uri(cfg, CLEAN_PATH)
    if not io.exists(in_uri):
        raise FileNotFoundError(
            f"{in_uri} does not exist: materialize sharegpt_clean first "
            "(python -m arenaflow.data, or the sharegpt_clean asset)"
        )
    model_dir = resolve_model(cfg.model, cfg.paths.cache_dir)
    out = io.artifact_uri(cfg, SFT_PATH)
    max_length = int(cfg.train.max_length)
    with tracker.start_run("data.sft_dataset", cfg, nested=nested) as run:
        stats = build_sft_dataset(
            in_uri,
            out,
            tokenizer_dir=str(model_dir),
            model_cfg=cfg.model,
            max_length=max_length,
            val_ratio=float(cfg.data.val_ratio),
            seed=int(cfg.data.split_seed),
            num_workers=int(cfg.data.num_workers),
            limit=cfg.data.get("sft_limit"),
        )
        lengths = stats.pop("lengths")
        key = "|".join(
            [
                file_hash(in_uri),
                stats["tokenizer_fingerprint"],
                str(max_length),
                str(cfg.data.val_ratio),
                str(cfg.data.split_seed),
                str(cfg.data.get("sft_limit")),
            ]
        )
        data_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
        stats["data_hash"] = data_hash
        io.write_json(io.artifact_uri(cfg, SFT_STATS_PATH), stats)
        fig = plots.histogram(
            lengths or [0], f"SFT example lengths (max_length={max_length})", "tokens"
        )
        png = plots.to_png(fig)
        fs, path = io.fs_for(io.artifact_uri(cfg, SFT_PLOT_PATH))
        with fs.open(path, "wb") as f:
            f.write(png)
        run.log_metrics(_count_metrics("sft", stats))
        run.log_dict(stats, "sft_stats.json")
        with tempfile.TemporaryDirectory() as tmp:
            local_png = Path(tmp) / "sft_lengths.png"
            local_png.write_bytes(png)
            run.log_artifact(local_png)
        run.set_tags({"data_hash": data_hash})
        return _finish(
            run,
            {
                "uri": out,
                "data_hash": data_hash,
                "counts": stats,
                "plot_uri": io.artifact_uri(cfg, SFT_PLOT_PATH),
                "model_path": str(model_dir),
            },
        )


def run(cfg: DictConfig) -> dict[str, Any]:
    """All three steps under one parent MLflow run `data` (each step a nested run)."""
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("data", cfg) as parent:
        raw = run_raw(cfg, tracker, nested=True)
        clean = run_clean(cfg, tracker, in_uri=raw["uri"], nested=True)
        sft = run_sft(cfg, tracker, in_uri=clean["uri"], nested=True)
        summary = {
            "raw.kept": raw["counts"]["kept"],
            "clean.kept": clean["counts"]["kept"],
            "sft.examples": sft["counts"]["examples"],
        }
        parent.log_metrics(summary)
        parent.set_tags({"data_hash": sft["data_hash"]})
    return {
        "raw_uri": raw["uri"],
        "clean_uri": clean["uri"],
        "sft_uri": sft["uri"],
        "data_hash": sft["data_hash"],
        "raw": raw["counts"],
        "clean": clean["counts"],
        "sft": sft["counts"],
        "run_id": parent.run_id,
    }
