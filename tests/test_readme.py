"""Every command the README shows is a real one: its make target exists, its module runs as
`python -m`, and its Hydra overrides compose against conf/ (a typo in a group or key fails here)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from arenaflow.config import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shell_lines() -> list[str]:
    """Commands of the README's bash code blocks, continuation lines joined, comments dropped."""
    lines: list[str] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S):
        if lang not in ("", "bash", "sh", "shell"):
            continue
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def overrides_of(tokens: list[str]) -> list[str]:
    """Hydra overrides among the tokens; a sweep (`-m a=1,2`) is checked with each value."""
    sweep = "-m" in tokens or "--multirun" in tokens
    out = []
    for t in tokens:
        if t.startswith("-") or "=" not in t or t.split("=", 1)[0].isupper():
            continue
        key, value = t.split("=", 1)
        if sweep and "," in value and not value.startswith("["):
            out.append([f"{key}={v}" for v in value.split(",")])
        else:
            out.append([t])
    # one composition per sweep value (the other overrides fixed)
    combos: list[list[str]] = [[]]
    for choices in out:
        combos = [[*c, v] for c in combos for v in choices]
    return combos


MODULE_COMMANDS = [line for line in shell_lines() if re.search(r"(^|\s)-m arenaflow\.\w+", line)]
MAKE_COMMANDS = [line for line in shell_lines() if line.startswith("make ")]


def test_the_readme_shows_commands_of_every_kind() -> None:
    assert len(MODULE_COMMANDS) >= 8 and len(MAKE_COMMANDS) >= 5
    assert README.lstrip().startswith("# arenaflow")
    quick = README.index("## Quick start")
    assert README.index("make run", quick) < README.index("make test", quick)


@pytest.mark.parametrize("line", MODULE_COMMANDS)
def test_module_command_composes(line: str) -> None:
    tokens = shlex.split(line)
    module = next(t for t in tokens if t.startswith("arenaflow."))
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
    args = tokens[tokens.index(module) + 1 :]
    combos = overrides_of(args)
    for overrides in combos:  # an unknown group option or key raises here
        compose_config(overrides, resolve=False)


@pytest.mark.parametrize("line", MAKE_COMMANDS)
def test_make_command_exists_and_its_overrides_compose(line: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    tokens = shlex.split(line)
    target = next((t for t in tokens[1:] if "=" not in t), "run")
    assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target}"
    if target != "run":
        return
    variables = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)
    experiment = variables.get("EXPERIMENT", "demo")
    assert (ROOT / "conf" / "experiment" / f"{experiment}.yaml").exists()
    extra = shlex.split(variables.get("OVERRIDES", ""))
    compose_config([f"experiment={experiment}", *extra], resolve=False)


def test_layout_table_names_real_places() -> None:
    """Every path in the README's layout table exists, and every stage has all four places."""
    section = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "`" in r]
    assert len(rows) == 6
    for row in rows:
        stage = row.strip("|").split("|")[0].strip()
        paths = re.findall(r"`([^`]+/[^`]*)`", row)
        assert len(paths) >= 4, row
        for path in paths:
            assert (ROOT / path).exists(), f"{stage}: {path} does not exist"
        assert (ROOT / "src" / "arenaflow" / stage / "stage.py").exists(), stage
