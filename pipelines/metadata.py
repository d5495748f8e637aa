"""Turn stage results into Dagster metadata: markdown tables, inline PNG plots, MLflow links."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg


def md_table(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "_(empty)_"
    columns = columns or list(rows[0].keys())
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    body = "".join("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |\n" for r in rows)
    return head + body


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ") if v is not None else ""


def counts_md(
    counts: Mapping[str, int], key: str = "reason", value: str = "count"
) -> dg.MetadataValue:
    rows = [{key: k, value: v} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    return dg.MetadataValue.md(md_table(rows, [key, value]))


def png_md(png: bytes, alt: str = "plot") -> dg.MetadataValue:
    """A PNG rendered inline in the Dagster UI."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def mlflow_link(url: str | None) -> dict[str, dg.MetadataValue]:
    return {"mlflow_run": dg.MetadataValue.url(url)} if url else {}
