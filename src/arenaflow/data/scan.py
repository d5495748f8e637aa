"""Finding where a JSON record ends without decoding it, so a bad record can be skipped and the
reader resynchronised (bracket- and string-aware, no recursion, linear regexes)."""

from __future__ import annotations

import json
import re

_DECODER = json.JSONDecoder()
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRUCTURE = re.compile(r'[\[\]{}"]')
_STRING_BODY = re.compile(r'[^"\\\n]*(?:\\.[^"\\\n]*)*')  # unrolled: linear, stops at " \n or end
_SCALAR_END = re.compile(r"[,\]}\n]")
_CLOSES = {"}": "{", "]": "["}


def scan_value(buf: str, pos: int) -> tuple[str, int]:
    """Where the JSON value at `buf[pos]` ends, by its brackets and strings alone.

    ("closed", end) when its brackets balance; ("broken", at) when they cannot (a closing bracket
    that does not match, a raw newline inside a string); ("open", len(buf)) when the text runs out
    first. Iterative, so nesting depth costs no recursion; every regex here is linear.
    """
    if buf[pos] not in '{["':
        m = _SCALAR_END.search(buf, pos + 1)
        return ("closed", m.start()) if m else ("open", len(buf))
    stack: list[str] = []
    i = pos
    while True:
        m = _STRUCTURE.search(buf, i)
        if m is None:
            return "open", len(buf)
        c, i = m.group(), m.end()
        if c == '"':
            i = _STRING_BODY.match(buf, i).end()
            if i >= len(buf) or (buf[i] == "\\" and i + 1 >= len(buf)):
                return "open", len(buf)
            if buf[i] != '"':
                return "broken", i
            i += 1
            if not stack:
                return "closed", i
        elif c in "[{":
            stack.append(c)
        elif not stack or stack.pop() != _CLOSES[c]:
            return "broken", m.start()
        elif not stack:
            return "closed", i


def next_line_record(buf: str, start: int, indent: int) -> int | None:
    """The first line after `start` that can begin a record at column `indent` or less.

    Raw newlines never occur inside JSON strings, and the lines inside a record are indented
    deeper than it, so in JSONL and pretty-printed arrays this is where the next record starts
    (after "}, " when the exporter joins records so), or the array's closing bracket, at a
    shallower column.
    """
    value = rf"[ \t]{{0,{indent}}}(?:\}},[ \t]*)?(?P<at>[^\s\]}},])"
    pattern = rf"\n(?:{value}|[ \t]{{0,{indent - 1}}}[\]}}])" if indent else rf"\n{value}"
    m = re.compile(pattern).search(buf, start)
    if m is None:
        return None
    return m.start("at") if m.group("at") else m.start() + 1


def next_inline_record(buf: str, start: int, key: str) -> int | None:
    """The next `{"<key>": ...}` after `start` that decodes and is followed by a separator.

    For records that share a line with the next one (a JSON array on one line): quotes inside
    strings are escaped, so `{"key":` in the raw text is always structure, never user text.
    """
    opener = re.compile(r'\{\s*"' + re.escape(json.dumps(key)[1:-1]) + r'"\s*:')
    follow = re.compile(r"\s*(?:[,\]]|$)")
    for m in opener.finditer(buf, start):
        try:
            _, end = _DECODER.raw_decode(buf, m.start())
        except (json.JSONDecodeError, RecursionError):
            continue
        if follow.match(buf, end):
            return m.start()
    return None


def reason_for(text: str, error: BaseException) -> str:
    if _SURROGATE.search(text):
        return "invalid_utf8"
    if "\x00" in text:
        return "nul_byte"
    if isinstance(error, RecursionError):
        return "too_deep"
    return "malformed_json"
