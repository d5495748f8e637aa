"""Plain marker types for a stage's rich output (tables, markdown, images, paths, links), and the
markdown table they render to. Dependency-free: library stages return these inside plain metadata
dicts, and `pipelines/metadata.py` turns them into Dagster metadata values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


def md_table(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub markdown table; floats to 4 significant digits, `_(empty)_` without rows."""
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


@dataclass(frozen=True)
class Markdown:
    text: str


@dataclass(frozen=True)
class Table:
    """Rows of dicts shown as a markdown table; `empty` stands in when there are no rows, `note`
    is a markdown paragraph above the table."""

    rows: list[Mapping[str, Any]]
    columns: list[str] | None = None
    empty: str = "_(empty)_"
    note: str = ""

    def markdown(self) -> str:
        table = md_table(self.rows, self.columns) if self.rows else self.empty
        return f"{self.note}\n\n{table}" if self.note else table


def counts_table(counts: Mapping[str, int], key: str = "reason", value: str = "count") -> Table:
    """Counts by name, largest first."""
    rows = [{key: k, value: v} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    return Table(rows, [key, value])


@dataclass(frozen=True)
class Path:
    """A file or folder (local path or fsspec URI)."""

    uri: str


@dataclass(frozen=True)
class Url:
    url: str


@dataclass(frozen=True)
class Image:
    """A PNG shown inline: its bytes, or the URI of a PNG file."""

    alt: str
    png: bytes | None = field(default=None, repr=False)
    uri: str | None = None
