"""Arena fixtures: a real uvicorn server with two tiny models (different seeds) and a vote database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from arenaflow.arena import VoteStore
from arenaflow.config import compose_config
from arenaflow.engine import Engine
from arenaflow.serve import create_app
from tests.serve.conftest import LiveServer, live_server

MODEL_NAMES = ("tiny-a", "tiny-b")


@dataclass
class ArenaServer:
    url: str
    db_url: str
    srv: LiveServer

    def votes(self) -> list[dict]:
        store = VoteStore(self.db_url)
        try:
            return store.battles()
        finally:
            store.dispose()


@pytest.fixture(scope="session")
def tiny_model_b_dir(model_cache: Path) -> Path:
    """The tiny model again with another seed: a second, different competitor (the same
    checkpoint as tests/serve/test_multi_model.py's, so a session builds it once)."""
    from arenaflow.models import resolve_model

    cfg = compose_config(["model=tiny_llama", "model.seed=4321", f"paths.cache_dir={model_cache}"])
    return resolve_model(cfg.model, cfg.paths.cache_dir)


@pytest.fixture(scope="session")
def arena_engines(tiny_model_dir: Path, tiny_model_b_dir: Path) -> dict[str, Engine]:
    return {
        MODEL_NAMES[0]: Engine.load(tiny_model_dir, max_batch_size=16),
        MODEL_NAMES[1]: Engine.load(tiny_model_b_dir, max_batch_size=16),
    }


@pytest.fixture
def start_arena(
    tmp_path: Path,
    model_cache: Path,
    tiny_model_dir: Path,
    tiny_model_b_dir: Path,
    arena_engines: dict[str, Engine],
) -> Callable[..., AbstractContextManager[ArenaServer]]:
    """`with start_arena(*overrides) as arena:` the app serving both tiny models, votes in tmp_path."""

    @contextmanager
    def _start(*overrides: str, models: int = 2) -> Iterator[ArenaServer]:
        db_url = f"sqlite:///{tmp_path / 'arena' / 'votes.db'}"
        dirs = (tiny_model_dir, tiny_model_b_dir)
        entries = ", ".join(
            f"{{name: {n}, uri: '{d}'}}" for n, d in zip(MODEL_NAMES, dirs, strict=True)
        )
        served = [] if models < 2 else [f"serve.models=[{entries}]"]
        cfg = compose_config(
            [
                "experiment=test",
                f"paths.home={tmp_path / 'home'}",
                f"paths.cache_dir={model_cache}",
                "tracking=none",
                f"serve.model_uri={tiny_model_dir}",
                f"serve.served_model_name={MODEL_NAMES[0]}",
                *served,
                f"serve.arena.db_url={db_url}",
                "serve.arena.max_tokens=4",
                *overrides,
            ]
        )
        engines = dict(list(arena_engines.items())[:models])
        with live_server(create_app(cfg, engines=engines), cfg) as srv:
            yield ArenaServer(url=srv.url, db_url=db_url, srv=srv)

    return _start
