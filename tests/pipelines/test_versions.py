"""Asset code versions come from the source they run: an edit in a reached package (or a shared
module) changes the version, an edit elsewhere does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines import versions
from pipelines.assets import judge, rating, train


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "arenaflow"
    shutil.copytree(versions.LIBRARY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(versions, "LIBRARY", copy)
    versions._digest.cache_clear()
    yield copy
    versions._digest.cache_clear()


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited\n")
    versions._digest.cache_clear()


def test_an_edit_in_the_code_an_asset_runs_changes_its_version(library: Path, tmp_path) -> None:
    asset = tmp_path / "asset.py"
    asset.write_text("from arenaflow.judge import judge\n")
    assert versions.stage_packages(str(asset)) == [
        "clients",
        "engine",
        "evaluate",
        "export",
        "judge",
    ]
    v0 = versions.source_version(str(asset))
    edit(library / "train" / "recipe.py")  # not reached from the judge
    assert versions.source_version(str(asset)) == v0
    edit(library / "engine" / "engine.py")  # reached through the judge's imports
    v1 = versions.source_version(str(asset))
    assert v1 != v0
    edit(library / "io.py")  # shared by every stage
    v2 = versions.source_version(str(asset))
    assert v2 != v1
    edit(asset)
    assert versions.source_version(str(asset)) != v2


def test_the_real_assets_carry_their_own_versions() -> None:
    by_group = {m.__name__: m.CODE_VERSION for m in (judge, rating, train)}
    assert len(set(by_group.values())) == 3 and all(len(v) == 12 for v in by_group.values())
    assert (
        judge.mt_bench_judgments.code_versions_by_key[judge.mt_bench_judgments.key]
        == judge.CODE_VERSION
    )
