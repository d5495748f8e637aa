"""The training code stays readable (issue 18): short modules and functions, and the YAML is the one
copy of every train/hardware/model default (no `.get(key, default)` on those sections in code)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = [
    *sorted((ROOT / "src" / "arenaflow" / "train").glob("*.py")),
    ROOT / "src" / "arenaflow" / "data" / "sft.py",
    ROOT / "benchmarks" / "bench_train.py",
]
SECTIONS = {"train", "hardware", "model", "tr", "hw"}


def _section(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def test_modules_and_functions_are_short() -> None:
    assert len(FILES) > 10
    too_long = []
    for path in FILES:
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    too_long.append(f"{path.name}:{node.name}: {n} lines")
    assert too_long == []


def test_config_sections_are_read_without_code_defaults() -> None:
    gets = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and _section(node.func.value) in SECTIONS
            ):
                gets.append(f"{path.name}:{node.lineno}")
    assert gets == []
