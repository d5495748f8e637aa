"""The one converter from a stage's plain metadata to Dagster metadata values.

Stages (`arenaflow.*`) describe what they did with plain values and the marker types of
`arenaflow.report`; `to_metadata` maps them: bool/int/float/str to the same kind, dict/list to
JSON, `Table`/`Markdown`/`Image` to markdown (an image inline as a PNG data URI), `Path` to a
path, `Url` to a link. A value that is None is left out.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import dagster as dg

from arenaflow import io
from arenaflow.report import Image, Markdown, Path, Table, Url


def metadata_value(value: Any) -> dg.MetadataValue:
    """One plain value as a Dagster metadata value."""
    if isinstance(value, dg.MetadataValue):
        return value
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    if isinstance(value, str):
        return dg.MetadataValue.text(value)
    if isinstance(value, Table):
        return dg.MetadataValue.md(value.markdown())
    if isinstance(value, Markdown):
        return dg.MetadataValue.md(value.text)
    if isinstance(value, Image):
        png = base64.b64encode(value.png if value.png is not None else _read(value.uri)).decode()
        return dg.MetadataValue.md(f"![{value.alt}](data:image/png;base64,{png})")
    if isinstance(value, Path):
        return dg.MetadataValue.path(value.uri)
    if isinstance(value, Url):
        return dg.MetadataValue.url(value.url)
    if isinstance(value, Mapping | list | tuple):
        return dg.MetadataValue.json(value if isinstance(value, Mapping) else list(value))
    raise TypeError(f"no Dagster metadata type for {type(value).__name__}: {value!r}")


def to_metadata(plain: Mapping[str, Any]) -> dict[str, dg.MetadataValue]:
    """Plain metadata (see the module docstring) as Dagster metadata; None values are left out."""
    return {k: metadata_value(v) for k, v in plain.items() if v is not None}


def output(value: Any, *metadata: Mapping[str, Any], mlflow_url: str | None = None) -> dg.Output:
    """An asset's Output: its value, and its metadata (later dicts win) converted by
    `to_metadata`, with `mlflow_run` linking the stage's MLflow run when it tracked one."""
    merged: dict[str, Any] = {}
    for part in metadata:
        merged.update(part)
    if mlflow_url:
        merged["mlflow_run"] = Url(mlflow_url)
    return dg.Output(value=value, metadata=to_metadata(merged))


SEVERITY = {"warn": dg.AssetCheckSeverity.WARN, "error": dg.AssetCheckSeverity.ERROR}


def check_result(check: Mapping[str, Any]) -> dg.AssetCheckResult:
    """A library check, `{passed, description, metadata}` with an optional `name` and `severity`
    (`warn`, or `error` by default), as Dagster's check result."""
    return dg.AssetCheckResult(
        check_name=check.get("name"),
        passed=bool(check["passed"]),
        severity=SEVERITY[check.get("severity", "error")],
        description=check.get("description"),
        metadata=to_metadata(check.get("metadata") or {}),
    )


def _read(uri: str | None) -> bytes:
    if not uri:
        raise ValueError("an Image needs its png bytes or a uri")
    fs, path = io.fs_for(uri)
    with fs.open(path, "rb") as f:
        return f.read()
