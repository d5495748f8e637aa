"""Imports go one way: pipelines -> arenaflow. The library never imports dagster."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "arenaflow"


def test_library_never_imports_dagster() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(SRC)}: {n}"
                for n in names
                if n.split(".")[0] in {"dagster", "pipelines"}
            ]
    assert offenders == []


def test_layering_check_detects_a_dagster_import(tmp_path) -> None:
    bad = ast.parse("import os\nfrom dagster import asset\n")
    mods = [n.module for n in ast.walk(bad) if isinstance(n, ast.ImportFrom)]
    assert mods == ["dagster"]
