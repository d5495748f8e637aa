"""The chat loop: read a line, stream the answer to the whole conversation so far, repeat.

Commands: `/clear` starts a new conversation (the system prompt stays), `/exit` leaves, and so do
Ctrl-D and Ctrl-C at the prompt. Ctrl-C during an answer stops that answer only. A turn that fails
(prompt too long, endpoint gone) is reported on one line and left out of the history, so the next
turn sees the conversation as it was.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from arenaflow.chat.backends import ChatBackend, ChatError, Message, backend_from_cfg
from arenaflow.chat.render import Renderer, renderer

HELP = "/clear starts a new conversation, /exit leaves (so do Ctrl-D and Ctrl-C), /help shows this"


@dataclass
class ChatSession:
    backend: ChatBackend
    ui: Renderer
    system: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512
    history: list[Message] = field(default_factory=list)
    turns: int = 0  # answered turns over the whole session

    def __post_init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def loop(self) -> None:
        """Until /exit, EOF or Ctrl-C at the prompt."""
        while True:
            try:
                line = self.ui.read().strip()
            except (EOFError, KeyboardInterrupt):
                self.ui.note("")
                return
            if not line:
                continue
            if line == "/exit":
                return
            if line == "/clear":
                self.clear()
                self.ui.note("(conversation cleared; the next message starts a new one)")
                continue
            if line == "/help":
                self.ui.note(HELP)
                continue
            self.turn(line)

    def turn(self, text: str) -> str | None:
        """One exchange; the answer joins the history only when it arrived whole."""
        self.history.append({"role": "user", "content": text})
        pieces = self.backend.stream(
            list(self.history), temperature=self.temperature, max_tokens=self.max_tokens
        )
        try:
            with closing(pieces):  # an interrupted answer frees the engine rows / the HTTP stream
                answer = self.ui.answer(pieces)
        except ChatError as e:
            self.history.pop()
            self.ui.error(str(e))
            return None
        except KeyboardInterrupt:
            self.history.pop()
            self.ui.note("(answer interrupted; this turn is not kept)")
            return None
        self.history.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer


def open_session(cfg: DictConfig, ui: Renderer | None = None) -> ChatSession:
    """Load the model or check the endpoint, print the banner: everything before the first prompt.

    Start-up problems (no such checkpoint, no champion in the registry, endpoint down) raise
    `ChatError`, `ValueError` or `OSError` here; the CLI turns them into exit status 2.
    """
    c = cfg.chat
    if not 0.0 <= float(c.temperature) <= 2.0:
        raise ValueError(f"chat.temperature must be in [0, 2] (0 = greedy), got {c.temperature}")
    if int(c.max_tokens) < 1:
        raise ValueError(f"chat.max_tokens must be >= 1, got {c.max_tokens}")
    ui = ui or renderer(str(c.style))
    backend = backend_from_cfg(cfg)
    origin = "" if backend.where == backend.name else f" ({backend.where})"
    ui.note(f"arenaflow chat with {backend.name}{origin}. {HELP}")
    return ChatSession(
        backend,
        ui,
        system=None if c.system is None else str(c.system),
        temperature=float(c.temperature),
        max_tokens=int(c.max_tokens),
    )


def run(cfg: DictConfig, ui: Renderer | None = None) -> dict[str, Any]:
    """Chat with `chat.endpoint` or the local `chat.model_uri` until the user leaves."""
    session = open_session(cfg, ui)
    session.loop()
    b = session.backend
    return {"model": b.name, "where": b.where, "turns": session.turns}
