"""One choice's text split, as it streams, into message content and tool calls (OpenAI deltas).

A call is a `<tool_call>` block holding `{"name": ..., "arguments": {...}}` (tools.py describes the
format). Content is withheld from the moment a block may be starting; once a block's head names a
declared function, its id and name go out, then its arguments text as it arrives (the arguments
end where their JSON object closes). A block whose head does not read that way is parsed whole when
it closes; one that is not a call of a declared function stays in the content as written. The
non-streamed answer runs the same splitter over the whole text, so both modes agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'
)
_DECODER = json.JSONDecoder()


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # JSON text of the arguments object

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Feed text deltas; get back OpenAI `delta` dicts (`content` or `tool_calls`)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self._buf = ""  # text not yet handed out
        self._in_block = False
        self._call: ToolCall | None = None  # the open block's call, once its head was read
        self._args_at = 0  # where its arguments start in the block's text
        self._args_done = False
        self._ws = ""  # whitespace after content, held until more content follows

    def text(self) -> str:
        return "".join(self.content)

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        while True:
            if not self._in_block:
                i = self._buf.find(OPEN)
                if i < 0:
                    cut = len(self._buf) - _open_prefix(self._buf)
                    out += self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return out
                out += self._content(self._buf[:i])
                self._buf = self._buf[i + len(OPEN) :]
                self._in_block, self._call, self._args_done = True, None, False
                continue
            j = self._buf.find(CLOSE)
            if j < 0:
                return out + self._progress(self._buf, closed=False)
            out += self._progress(self._buf[:j], closed=True)
            out += self._close(self._buf[:j], CLOSE)
            self._buf = self._buf[j + len(CLOSE) :]
            self._in_block = False

    def finish(self) -> list[dict[str, Any]]:
        """The rest once generation ended (a block cut short still yields what it holds)."""
        if self._in_block:
            out = self._progress(self._buf, closed=True) + self._close(self._buf, "")
        else:
            out = self._content(self._buf)
        self._buf, self._in_block = "", False
        return out

    def _content(self, text: str) -> list[dict[str, Any]]:
        """Content without leading or trailing whitespace (interior whitespace kept)."""
        if not text:
            return []
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body) :] if self.content or body.strip() else ""
        if not self.content:
            body = body.lstrip()
        if not body:
            return []
        self.content.append(body)
        return [{"content": body}]

    def _progress(self, block: str, closed: bool) -> list[dict[str, Any]]:
        """The open block's head (id, name) once readable, then its new arguments text."""
        out: list[dict[str, Any]] = []
        if self._call is None:
            head = _HEAD.match(block)
            if head is None or head.group(1) not in self.names:
                return out
            self._call = ToolCall(new_call_id(), head.group(1))
            self._args_at = head.end()
            self.calls.append(self._call)
            out.append(self._delta({"id": self._call.id, "type": "function"}, head.group(1), ""))
        if self._args_done:
            return out
        rest, sent = block[self._args_at :], len(self._call.arguments)
        try:
            _, end = _DECODER.raw_decode(rest)
            self._args_done = True
        except ValueError:
            end = len(rest)
            if closed:  # never closed its object: best effort, without the block's own brace
                tail = rest.rstrip()
                end = len(tail) - (tail.endswith("}") and tail.count("}") > tail.count("{"))
        piece = rest[sent:end]
        if piece:
            self._call.arguments += piece
            out.append(self._delta({}, None, piece))
        return out

    def _close(self, block: str, close: str) -> list[dict[str, Any]]:
        """A block that ended; one whose head never read as a call is parsed whole here."""
        if self._call is not None:
            self._call = None
            return []
        call = _whole_call(block, self.names)
        if call is None:
            return self._content(f"{OPEN}{block}{close}")
        self.calls.append(call)
        return [self._delta({"id": call.id, "type": "function"}, call.name, call.arguments)]

    def _delta(self, extra: dict[str, Any], name: str | None, arguments: str) -> dict[str, Any]:
        function = {"name": name, "arguments": arguments} if name else {"arguments": arguments}
        call = {"index": len(self.calls) - 1, **extra, "function": function}
        return {"tool_calls": [call]}


def _whole_call(block: str, names: set[str]) -> ToolCall | None:
    """A block as a call of a declared function (arguments an object, or JSON text of one)."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _open_prefix(text: str) -> int:
    """Length of the longest tail of `text` that `<tool_call>` starts with (held back)."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0
