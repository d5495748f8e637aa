"""Shared fixtures: composed test configs in a temp home, a session-wide model cache, tiny models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("ARENAFLOW_OVERRIDES", None)

from arenaflow.config import compose_config  # noqa: E402

CfgFactory = Callable[..., DictConfig]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted / built checkpoints are shared by all tests of a session."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def af_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def base_overrides(home: Path, cache: Path) -> list[str]:
    return ["experiment=test", f"paths.home={home}", f"paths.cache_dir={cache}"]


@pytest.fixture
def make_cfg(af_home: Path, model_cache: Path) -> CfgFactory:
    """Compose the real config tree with the test experiment, in a temp home with a real MLflow store."""

    def _make(*overrides: str) -> DictConfig:
        return compose_config([*base_overrides(af_home, model_cache), *overrides])

    return _make


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache: Path) -> Path:
    from arenaflow.models import resolve_model

    cfg = compose_config(["model=tiny_llama", f"paths.cache_dir={model_cache}"])
    return resolve_model(cfg.model, cfg.paths.cache_dir)


@pytest.fixture(scope="session")
def smollm_dir(model_cache: Path) -> Path:
    from arenaflow.models import resolve_model

    cfg = compose_config(["model=smollm2_135m", f"paths.cache_dir={model_cache}"])
    return resolve_model(cfg.model, cfg.paths.cache_dir)


@pytest.fixture(scope="session")
def tiny_adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> dict[str, Path]:
    """Two LoRA adapter checkpoints over the tiny Llama (read-only: copy one to change it)."""
    from tests.adapter_checkpoints import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora-a": make_adapter(tiny_model_dir, root / "lora-a", seed=1),
        "lora-b": make_adapter(tiny_model_dir, root / "lora-b", seed=2),
    }
