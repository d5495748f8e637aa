"""Serving fixtures: real uvicorn servers on free loopback ports around the tiny model's engine.

Servers run in a background thread of the test process so one loaded engine is shared by every
app; each server is stopped when its fixture ends, also when the test fails.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from omegaconf import DictConfig

from arenaflow.config import compose_config
from arenaflow.engine import Engine
from arenaflow.serve import create_app
from arenaflow.serve.loading import model_specs, resolve_served_model
from arenaflow.serve.security import uvicorn_proxy_options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str  # base URL without /v1
    cfg: DictConfig

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def metric(self, name: str) -> float:
        """Sum of the samples of one metric (all label sets)."""
        total, found = 0.0, False
        for line in self.metrics().splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"metric {name} not exported"
        return total


@contextmanager
def live_server(app, cfg: DictConfig) -> Iterator[LiveServer]:
    """Run `app` under uvicorn on a free port until the block ends."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            **uvicorn_proxy_options(cfg),  # as `python -m arenaflow.serve` runs it
        )
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not server.started:
            if not thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield LiveServer(url, cfg)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn thread did not stop"


@pytest.fixture(scope="session")
def serve_engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir, max_batch_size=16)


@pytest.fixture(scope="session")
def serve_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="session")
def serve_cfg_factory(
    serve_home: Path, model_cache: Path, tiny_model_dir: Path
) -> Callable[..., DictConfig]:
    def _make(*overrides: str) -> DictConfig:
        return compose_config(
            [
                "experiment=test",
                f"paths.home={serve_home}",
                f"paths.cache_dir={model_cache}",
                "tracking=none",
                f"serve.model_uri={tiny_model_dir}",
                "serve.served_model_name=tiny-chat",
                *overrides,
            ]
        )

    return _make


@pytest.fixture(scope="session")
def start_server(serve_engine: Engine, serve_cfg_factory):
    """`with start_server(*overrides) as srv:` an app on the shared engine with these serve overrides."""

    @contextmanager
    def _start(*overrides: str) -> Iterator[LiveServer]:
        cfg = serve_cfg_factory(*overrides)
        name = model_specs(cfg)[0].name
        app = create_app(
            cfg, engines={name: serve_engine}, served_models={name: resolve_served_model(cfg)}
        )
        with live_server(app, cfg) as srv:
            yield srv

    return _start


@pytest.fixture(scope="module")
def server(start_server) -> Iterator[LiveServer]:
    with start_server() as srv:
        yield srv
