"""Fixtures of the GGUF export tests: the tiny Llama written to GGUF once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from arenaflow.export import write_gguf

LINEAGE = {"base_model": "tiny-llama", "arenaflow.data_hash": "0123456789abcdef"}


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    return write_gguf(tiny_model_dir, out, metadata=LINEAGE)
