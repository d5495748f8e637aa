"""What a finished run reports: its history across resumes, its throughput, and result.json.

`fit` hands rank 0's `FitOutcome` to `finish`, which tracks the summary, registers and uploads the
final model and writes the result every caller (CLI, Dagster asset, bench) reads. A LoRA run
registers its adapter (tags `adapter=true`, `base_model=<base reference>`), or with
`train.lora.merge=true` the merged full checkpoint instead, the adapter kept as the run's
`adapter` artifact: one version per run either way, and the merged one loads anywhere a full
checkpoint does (GGUF export, engines without LoRA support).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.export.registry import attach_gguf
from arenaflow.tracking import Tracker
from arenaflow.train.flops import best_cpu_peak_flops
from arenaflow.train.lora import ADAPTER_META, LoraSettings

if TYPE_CHECKING:
    from arenaflow.train.recipe import TrainPlan

log = logging.getLogger(__name__)


@dataclass
class FitOutcome:
    """What one rank's `trainer.fit` produced, for rank 0 to report."""

    run: Any  # the tracker's run
    metrics: Any  # callbacks.StepMetrics: step and validation history of this process
    trainer: Any  # lightning.Trainer after fit
    final_dir: Path
    tags: dict[str, str]
    train_time_s: float
    peak: float  # per-device peak FLOP/s the steps were rated against
    peak_source: str
    data_counts: dict[str, Any]
    resumed_from: Path | None
    retained_heap: bool
    adapter_dir: Path | None = None  # LoRA: the adapter checkpoint (final_dir unless merged)


def read_history(out_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl across resumes; a step replayed after a kill keeps its latest record."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def throughput_summary(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """Throughput over the run; the first step (warm-up, data loading start) is left out when possible."""
    rows = history[1:] if len(history) > 2 else history
    if not rows:
        return {"tokens_per_s": None, "trained_tokens_per_s": None, "mfu": None}
    dt = sum(r["step_time_s"] for r in rows)
    mfu = sum(r["mfu"] * r["step_time_s"] for r in rows) / dt
    return {
        "tokens_per_s": sum(r["input_tokens"] for r in rows) / dt,
        "trained_tokens_per_s": sum(r["trained_tokens"] for r in rows) / dt,
        "mfu": mfu,
    }


def _rated_summary(
    history: list[dict[str, Any]], peak: float, peak_source: str, cache_dir: str
) -> tuple[dict[str, float | None], float]:
    """The run's throughput summary and the peak its MFU is rated against."""
    summary = throughput_summary(history)
    if peak_source == "cpu_fp32_matmul_probe":
        # A start probe taken while other work shared the cores reads low; probe again now and
        # rate the run against the better of the two (the step logs keep the start peak).
        end_peak = best_cpu_peak_flops(cache_dir)
        if end_peak > peak:
            if summary["mfu"] is not None:
                summary["mfu"] *= peak / end_peak
            peak = end_peak
    return summary, peak


def training_memory(module: Any, optimizer: Any) -> dict[str, float]:
    """What training held besides the weights, measured on this rank at the end (GiB): a gradient
    for every trainable parameter element, the optimizer's state tensors, and the process's peak
    resident memory. Under FSDP, this rank's shards."""
    import resource

    import torch

    def nbytes(t: Any) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    grads = sum(nbytes(p) for p in module.parameters() if p.requires_grad)
    states = sum(
        nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    gib = 1024**3
    return {
        "grads_gb": grads / gib,
        "optimizer_gb": states / gib,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib,
    }


def adapter_summary(adapter_dir: Path | None, p: TrainPlan) -> dict[str, Any] | None:
    """A LoRA run's adapter: its folder, its base (arenaflow_adapter.json), whether it was merged."""
    if adapter_dir is None:
        return None
    meta = json.loads((Path(adapter_dir) / ADAPTER_META).read_text())
    return {
        "path": str(adapter_dir),
        "base": meta["base"],
        "base_digest": meta["base_digest"],
        "merged": Path(adapter_dir) != Path(p.out_dir) / "final",
    }


def version_tags(
    tags: dict[str, str], lora: Any, adapter: dict[str, Any] | None, model_name: str
) -> dict[str, str]:
    """The registered version's lineage tags. An adapter's `base_model` is its base's reference
    (what a loader resolves; the name moves to `base_model_name`); a merged checkpoint is a full
    model of the usual tags that records the adapter's base in `adapter_base`."""
    if adapter is None:
        return dict(tags)
    settings = LoraSettings.from_cfg(lora)
    extra = settings.tags() if settings else {}
    if adapter["merged"]:
        return {**tags, **extra, "merged_adapter": "true", "adapter_base": adapter["base"]}
    return {
        **tags,
        **extra,
        "adapter": "true",
        "base_model": adapter["base"],
        "base_model_name": model_name,
        "base_digest": adapter["base_digest"],
    }


def finish(cfg: DictConfig, p: TrainPlan, tracker: Tracker, o: FitOutcome) -> dict[str, Any]:
    """Rank 0: track the summary, register and upload the final model, write result.json."""
    history = read_history(Path(p.out_dir))
    summary, peak = _rated_summary(
        o.metrics.history, o.peak, o.peak_source, str(cfg.paths.cache_dir)
    )
    memory = training_memory(o.trainer.lightning_module, o.trainer.optimizers[0])
    o.run.log_metrics({f"summary_{k}": v for k, v in summary.items() if v is not None})
    o.run.log_metrics({f"summary_measured_{k}": v for k, v in memory.items()})
    o.run.log_dict({"plan": p.to_json(), "data_counts": o.data_counts}, "train_plan.json")
    version = None
    model_uri = None
    gguf: dict[str, str] = {}  # format -> runs:/ URI of the version's GGUF file
    name = cfg.tracking.registered_model_name
    adapter = adapter_summary(o.adapter_dir, p)
    if adapter and adapter["merged"]:
        o.run.log_artifact(o.adapter_dir, "adapter")  # the merged version is registered
    if cfg.train.register:
        tags = version_tags(o.tags, cfg.train.lora, adapter, cfg.model.name)
        info = tracker.register_model(o.run, o.final_dir, name, tags=tags)
        if info is not None:
            version = info.version
            model_uri = f"models:/{name}/{version}"
        gguf = attach_gguf(tracker, info, o.final_dir, cfg.model.gguf_export or (), run=o.run)
    uploaded = io.upload_dir(
        o.final_dir, io.artifact_uri(cfg, "models", "finetuned", Path(p.out_dir).name, "final")
    )
    val_history = o.metrics.val_history
    result = {
        "path": str(o.final_dir),
        "uri": uploaded,
        "model_uri": model_uri,
        "version": version,
        "registered_name": name if version else None,
        "gguf": gguf,
        "run_id": o.run.run_id,
        "run_url": o.run.url,
        "final_loss": history[-1]["loss"] if history else None,
        "val_loss": val_history[-1]["val_loss"] if val_history else None,
        "steps": int(o.trainer.global_step),
        "resumed_from": o.resumed_from.name if o.resumed_from else None,
        "chat_template_hash": o.tags["chat_template_hash"],
        "data_hash": p.data_hash,
        "base_model": cfg.model.name,
        "train_time_s": o.train_time_s,
        "peak_tflops": peak / 1e12,
        "peak_source": o.peak_source,
        "world_size": p.world_size,
        "micro_batch_size": p.micro_batch_size,
        "accumulate": p.accumulate,
        "n_params": p.shape["n_params"],
        "trainable_params": p.trainable_params or p.shape["n_params"],
        "adapter": adapter,
        "memory_estimate_gb": p.memory,
        "memory_measured_gb": memory,
        "data_counts": o.data_counts,
        "sharding": o.trainer.lightning_module.sharding,
        "compiled": o.trainer.lightning_module.compiled,
        "retained_heap": o.retained_heap,
        "history": history,
        "val_history": val_history,
        **summary,
    }
    io.write_json(str(Path(p.out_dir) / "result.json"), result)
    log.info(
        "trained %d steps; final loss %s; model %s",
        result["steps"],
        result["final_loss"],
        model_uri or o.final_dir,
    )
    return result
