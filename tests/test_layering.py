"""Imports go one way: pipelines -> arenaflow. The library never imports dagster."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "arenaflow"
FORBIDDEN = {"dagster", "dagster_pipes", "pipelines"}


def forbidden_imports(root: Path) -> list[str]:
    """Every `import x` / `from x import y` under `root` whose top package is FORBIDDEN."""
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            offenders += [
                f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN
            ]
    return offenders


def test_library_never_imports_dagster() -> None:
    assert len(list(SRC.rglob("*.py"))) > 50  # the real tree, not an empty folder
    assert forbidden_imports(SRC) == []


def test_the_check_finds_imports_anywhere_in_a_tree(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "ok.py").write_text("import os\nfrom . import dagster\n")
    (pkg / "bad.py").write_text(
        "def f():\n    import dagster_pipes\n    from pipelines.assets import x\n"
        "import dagster as dg\n"
    )
    assert sorted(forbidden_imports(tmp_path / "pkg")) == [
        "sub/bad.py: dagster",
        "sub/bad.py: dagster_pipes",
        "sub/bad.py: pipelines.assets",
    ]
