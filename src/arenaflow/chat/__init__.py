"""Chat in the terminal (FastChat's `serve.cli`): `python -m arenaflow.chat`, or `run(cfg)` from code.

Talks to a local model through the project's engine (checkpoint folder, `models:/`, `runs:/`) or to
any OpenAI-compatible endpoint, streaming each answer as plain text or live-rendered markdown.
"""

from arenaflow.chat.backends import ChatError, EndpointChat, LocalChat, backend_from_cfg
from arenaflow.chat.session import ChatSession, open_session, run

__all__ = [
    "ChatError",
    "ChatSession",
    "EndpointChat",
    "LocalChat",
    "backend_from_cfg",
    "open_session",
    "run",
]
