"""How a terminal chat looks: plain streamed text (`simple`) or markdown rendered live with rich (`rich`).

A renderer reads the user's line, shows the assistant's answer as its pieces arrive and returns the
whole answer, and prints notes and errors; the session loop knows nothing of terminals.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from typing import Protocol

USER, ASSISTANT = "USER", "ASSISTANT"


class Renderer(Protocol):
    def read(self) -> str:
        """The user's next line (raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C)."""
        ...

    def answer(self, pieces: Iterable[str]) -> str: ...

    def note(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...


class SimpleRenderer:
    """Plain text, each piece written as soon as it is decoded (FastChat's `--style simple`)."""

    def __init__(self) -> None:
        with contextlib.suppress(ImportError):  # line editing + history for input() where available
            import readline  # noqa: F401

    def read(self) -> str:
        return input(f"{USER}: ")

    def answer(self, pieces: Iterable[str]) -> str:
        out = sys.stdout
        out.write(f"{ASSISTANT}: ")
        out.flush()
        text: list[str] = []
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
                text.append(piece)
        finally:
            out.write("\n")
            out.flush()
        return "".join(text)

    def note(self, text: str) -> None:
        print(text, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)


class RichRenderer:
    """The answer re-rendered as markdown while it streams (code blocks, lists, tables)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.errors = Console(stderr=True, highlight=False)

    def read(self) -> str:
        return self.console.input(f"[bold green]{USER}[/]: ")

    def answer(self, pieces: Iterable[str]) -> str:
        from rich.live import Live
        from rich.markdown import Markdown

        self.console.print(f"[bold blue]{ASSISTANT}[/]:")
        text = ""
        with Live(
            Markdown(text),
            console=self.console,
            refresh_per_second=8,
            vertical_overflow="visible",
        ) as live:
            for piece in pieces:
                text += piece
                live.update(Markdown(text))
        return text

    def note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False)

    def error(self, text: str) -> None:
        self.errors.print(f"error: {text}", style="bold red", markup=False)


def renderer(style: str) -> Renderer:
    if style == "simple":
        return SimpleRenderer()
    if style == "rich":
        return RichRenderer()
    raise ValueError(f"unknown chat.style {style!r}; use simple or rich")
