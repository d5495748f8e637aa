"""Chat fixtures: the serving tests' uvicorn servers and shared tiny engine, plus a short-context copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve.conftest import (  # noqa: F401  (fixtures shared with the serving tests)
    serve_cfg_factory,
    serve_engine,
    serve_home,
    start_server,
)


@pytest.fixture(scope="session")
def short_context_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a 96-token context window (same weights), so prompts can overflow it."""
    dest = tmp_path_factory.mktemp("short-context")
    for f in tiny_model_dir.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 96
    (dest / "config.json").write_text(json.dumps(config))
    return dest
