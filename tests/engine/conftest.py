"""Engine fixtures: one tiny-model engine per session (loading is cheap, but tests share it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from arenaflow.engine import Engine


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(tiny_model_dir)


@pytest.fixture(scope="session")
def chat_prompts(tiny_engine: Engine) -> list[str]:
    """Prompts of very different lengths, so batching really pads."""
    questions = [
        "Hi",
        "What is the capital of France? Answer in one word.",
        "Write a long poem about the sea, the sky, the wind, the salt and the sailors " * 3,
        "List three prime numbers.",
        "Explain gravity to a child.",
    ]
    return [tiny_engine.render_chat([{"role": "user", "content": q}]) for q in questions]
