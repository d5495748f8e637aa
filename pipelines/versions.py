"""Code versions derived from the source an asset runs, so that editing a stage's code (not only
its config or inputs) makes `make run` and Dagster's staleness view materialize it again.

An asset's version hashes its own asset module, the arenaflow packages it imports and, following
their `arenaflow.<package>` imports, every package those reach (static files included), plus the
library's top-level modules (io, config, tracking, models, plots) that every stage shares.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

import arenaflow

LIBRARY = Path(arenaflow.__file__).resolve().parent


@cache
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _package_files(name: str) -> list[Path]:
    return sorted(
        p for p in (LIBRARY / name).rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def _imported(paths: list[Path]) -> set[str]:
    """The arenaflow sub-packages (folders) these files import (the code, not its comments)."""
    names = set()
    for path in paths:
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            names.update(m.split(".")[1] for m in modules if m.startswith("arenaflow."))
    return {n for n in names if (LIBRARY / n).is_dir()}


def stage_packages(asset_file: str) -> list[str]:
    """Every arenaflow package an asset module reaches through imports, sorted."""
    seen: set[str] = set()
    todo = _imported([Path(asset_file)])
    while todo:
        name = todo.pop()
        seen.add(name)
        todo |= _imported(_package_files(name)) - seen
    return sorted(seen)


def source_version(asset_file: str) -> str:
    """A short hash of `asset_file` and all the library source it can run."""
    paths = [Path(asset_file).resolve(), *sorted(LIBRARY.glob("*.py"))]
    paths += [p for name in stage_packages(asset_file) for p in _package_files(name)]
    h = hashlib.sha256()
    for path in paths:
        name = path.relative_to(LIBRARY) if path.is_relative_to(LIBRARY) else Path(path.name)
        h.update(f"{name}:{_digest(path)}\n".encode())
    return h.hexdigest()[:12]
