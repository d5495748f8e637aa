"""Compose the Hydra config tree in `conf/` from code (Dagster, tests, notebooks) and from the CLI.

Every stage receives a resolved `DictConfig`; this module is the one place that knows where
the tree lives and how overrides are applied, so the CLI and the Dagster assets see the same config.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]


def conf_dir() -> Path:
    """The Hydra config tree: `$ARENAFLOW_CONF_DIR`, else `conf/` at the repo root."""
    return Path(os.environ.get("ARENAFLOW_CONF_DIR", REPO_ROOT / "conf")).resolve()


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("af.repo_root"):
        OmegaConf.register_new_resolver("af.repo_root", lambda: str(REPO_ROOT))


_register_resolvers()


def compose_config(overrides: Sequence[str] = (), *, resolve: bool = True) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides (e.g. ["experiment=test", "train.lr=1e-4"])."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if resolve:
        OmegaConf.resolve(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig | dict[str, Any], *keys: str) -> str:
    """A short stable hash of (parts of) a config, for code/data versions and cache keys."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    if keys:
        container = {k: container.get(k) for k in keys}
    payload = OmegaConf.to_yaml(OmegaConf.create(container)).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def hydra_main(stage: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """Wrap a stage's `run(cfg)` as a Hydra CLI entry point (`python -m arenaflow.<stage> ...`)."""
    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        OmegaConf.resolve(cfg)
        result = stage(cfg)
        if result is not None:
            print(OmegaConf.to_yaml(OmegaConf.create(_jsonable(result))))
        return result

    return _main


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)
