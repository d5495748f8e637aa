"""GGUF files next to each registered checkpoint, and the GGUF file a checkpoint is served from.

Where they live: the files of `model.gguf_export` are MLflow artifacts under `gguf/` of the run
that registered the version (beside its `model/` artifact, the safetensors checkpoint), and the
version carries a tag per file, `arenaflow.gguf.<format>` = `runs:/<run id>/gguf/model-<format>.gguf`.
Not inside the logged model: every loader of `models:/name/N` downloads `model/`, and the hf
backend has no use for three more copies of the weights. Each file embeds the version's lineage
tags as `arenaflow.*` metadata, plus `arenaflow.model_version` and `arenaflow.run_id`.

A base version registered before GGUF export existed gets its missing files on the next
`register_base` (logged to a `gguf_export` run, which its tags then name).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

from arenaflow.export import check_formats, export_gguf, gguf_format, gguf_name
from arenaflow.export.gguf import write_gguf
from arenaflow.export.quantize import quantize_gguf
from arenaflow.redact import redact
from arenaflow.tracking import ModelVersionInfo, Run, Tracker

log = logging.getLogger(__name__)

TAG_PREFIX = "arenaflow.gguf."
ARTIFACT_DIR = "gguf"


def version_gguf(version: ModelVersionInfo, fmt: str) -> str | None:
    """The `runs:/` URI of a version's GGUF file of `fmt`, or None when it has none."""
    return version.tags.get(f"{TAG_PREFIX}{fmt}")


def lineage_metadata(version: ModelVersionInfo) -> dict[str, str]:
    """What a GGUF file of `version` records about where it came from."""
    tags = {
        k: str(v) for k, v in redact(dict(version.tags)).items() if not k.startswith(TAG_PREFIX)
    }
    return {
        **tags,
        "arenaflow.model_version": f"models:/{version.name}/{version.version}",
        "arenaflow.run_id": str(version.run_id),
    }


def attach_gguf(
    tracker: Tracker,
    version: ModelVersionInfo | None,
    checkpoint: str | Path,
    formats: Iterable[str],
    *,
    run: Run | None = None,
) -> dict[str, str]:
    """Export `checkpoint` (the folder `version` was registered from) to the `formats` it has no
    file of yet, log them under `gguf/` of `run` (the registering run; None: a new `gguf_export`
    run) and tag the version. Returns every format's `runs:/` URI; {} without a version."""
    if version is None:
        return {}
    wanted = check_formats(formats)
    have = {f: uri for f in wanted if (uri := version_gguf(version, f))}
    missing = [f for f in wanted if f not in have]
    if not missing:
        return have
    if run is None:
        with tracker.start_run(
            "gguf_export", tags={"arenaflow.model_version": version.version}
        ) as r:
            return {**have, **_log_files(tracker, r, version, checkpoint, missing)}
    return {**have, **_log_files(tracker, run, version, checkpoint, missing)}


def _log_files(
    tracker: Tracker,
    run: Run,
    version: ModelVersionInfo,
    checkpoint: str | Path,
    formats: list[str],
) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="arenaflow-gguf-") as scratch:
        try:
            files = export_gguf(
                checkpoint,
                scratch,
                formats,
                metadata=lineage_metadata(version),
                tracking_uri=getattr(tracker, "tracking_uri", None),
            )
        except ValueError as e:
            raise ValueError(
                f"{version.name} version {version.version}: no GGUF export ({e}); "
                "set model.gguf_export=[] to register it without GGUF files"
            ) from e
        for path in files.values():
            run.log_artifact(path, ARTIFACT_DIR)
    uris = {fmt: f"runs:/{run.run_id}/{ARTIFACT_DIR}/{p.name}" for fmt, p in files.items()}
    tracker.set_version_tags(
        version.name, version.version, {f"{TAG_PREFIX}{f}": u for f, u in uris.items()}
    )
    log.info("GGUF %s attached to %s version %s", ", ".join(uris), version.name, version.version)
    return uris


def resolve_gguf(
    checkpoint: str | Path,
    quantization: str | None,
    cache_dir: str | Path,
    *,
    version: ModelVersionInfo | None = None,
    tracker: Tracker | None = None,
) -> Path:
    """The GGUF file llama.cpp loads for `checkpoint` at `quantization` (`model.quantization`: null
    -> f16, q8_0, q4_k_m). A registry version's own file when it has one (downloaded once into
    `cache_dir/gguf`), else one converted from the folder once, cached under `cache_dir/gguf/<the
    folder's content hash>` (never inside the checkpoint, whose files are its identity)."""
    fmt = gguf_format(quantization)
    uri = version_gguf(version, fmt) if version is not None else None
    if uri is not None and tracker is not None and tracker.enabled:
        return _downloaded(tracker, version, uri, cache_dir)
    from arenaflow.models import checkpoint_identity

    folder = Path(cache_dir) / "gguf" / checkpoint_identity(checkpoint)
    tracking_uri = getattr(tracker, "tracking_uri", None)
    return _converted(Path(checkpoint), folder, fmt, tracking_uri)


def _downloaded(
    tracker: Tracker, version: ModelVersionInfo, uri: str, cache_dir: str | Path
) -> Path:
    from arenaflow.models import publish_dir

    key = hashlib.sha256(uri.encode()).hexdigest()[:10]
    dest = Path(cache_dir) / "gguf" / f"{version.name}-v{version.version}-{key}"
    folder = publish_dir(dest, lambda tmp: tracker.download_model(uri, tmp))
    return folder / uri.rsplit("/", 1)[-1]


def _converted(checkpoint: Path, folder: Path, fmt: str, tracking_uri: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / gguf_name(fmt)
    with FileLock(str(folder / ".lock")):
        if target.exists():
            return target
        meta = {"arenaflow.source_checkpoint": str(checkpoint)}
        if fmt == "bf16":  # rounded from the weights themselves, not from the f16 file
            return write_gguf(
                checkpoint, target, outtype="bf16", metadata=meta, tracking_uri=tracking_uri
            )
        f16 = folder / gguf_name("f16")
        if not f16.exists():
            write_gguf(checkpoint, f16, metadata=meta, tracking_uri=tracking_uri)
        if fmt != "f16":
            quantize_gguf(f16, target, fmt)
    return target


def resolve_lora_gguf(adapter: str | Path, base: str | Path, cache_dir: str | Path) -> Path:
    """The GGUF LoRA file of the adapter folder `adapter` over its base checkpoint folder `base`:
    converted once, cached under `cache_dir/gguf/<the adapter folder's content hash>`."""
    from transformers import AutoConfig

    from arenaflow.export.lora import LORA_GGUF, write_lora_gguf
    from arenaflow.models import checkpoint_identity

    folder = Path(cache_dir) / "gguf" / checkpoint_identity(adapter)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / LORA_GGUF
    with FileLock(str(folder / ".lock")):
        if not target.exists():
            write_lora_gguf(adapter, AutoConfig.from_pretrained(str(base)), target)
    return target
