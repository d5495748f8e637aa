"""One ShareGPT value cleaned: HTML to markdown, code fences and copy-button noise (FastChat's
rules). Every pattern runs in linear time on any text (50 KB of backticks and "Copy code" hung a
worker under FastChat's backtracking regexes)."""

from __future__ import annotations

import bisect
import re
from collections import Counter

# An HTML value starts with a block-level tag (after an optional "N / N" regenerate counter);
# inline tags such as <br> inside markdown tables are markdown and stay.
_HTML_START = re.compile(
    r"\s*(?:\d+\s*/\s*\d+\s*)?<(?:div|p|span|pre|ol|ul|h[1-6]|table|blockquote|code)\b", re.I
)
# Every pattern here runs in linear time on any text: `[^<>]*` stops at the next tag, so no two
# attempts scan the same characters. FastChat's two copy-button regexes backtrack (cubic and
# quadratic: 50 KB of backticks and "Copy code" hung a worker), so they are plain scans below.
_DIV_SPAN = re.compile(r"</?(?:div|span)\b[^<>]*>", re.I)
_REGENERATE = re.compile(r"\d+ / \d+")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_FENCE, _COPY = "```", "Copy code"
_BLANK_LINES = re.compile(r"\n{3,}")


def is_html(value: str) -> bool:
    return "<" in value and _HTML_START.match(value) is not None


def reformat_code(value: str) -> str:
    r"""ShareGPT's "```pythonCopy code<code>```" -> a fenced block with its language.

    FastChat's `re.sub(r"```\s*(.*?)(?:Copy code)+(.+?)\s*?```", r"```\1\n\2\n```", value,
    flags=re.DOTALL)`, as a scan: the language runs to the first "Copy code" after a fence, the
    code from the last of the run of "Copy code" to the next fence, without trailing space.
    """
    out: list[str] = []
    done = 0
    while (start := value.find(_FENCE, done)) != -1:
        copy = value.find(_COPY, start + 3)
        if copy == -1:
            break
        code = copy + len(_COPY)
        while value.startswith(_COPY, code):
            code += len(_COPY)
        fence = value.find(_FENCE, code + 1)
        if fence == -1 and code - copy > len(_COPY) and value.startswith(_FENCE, code):
            code, fence = code - len(_COPY), code  # the last "Copy code" becomes the code
        if fence == -1:
            break
        end = fence
        while end > code + 1 and value[end - 1].isspace():
            end -= 1
        lang = value[start + 3 : copy].lstrip()
        out.append(f"{value[done:start]}```{lang}\n{value[code:end]}\n```")
        done = fence + 3
    out.append(value[done:])
    return "".join(out)


def remove_empty_copy_code(value: str) -> str:
    r"""FastChat's `re.sub(r"```(.*?)Copy code\s*```", "", value)`, as a linear scan.

    A match is a fence, then on the same line the first "Copy code" followed by only whitespace
    and another fence.
    """
    if _COPY not in value:
        return value
    closes: list[int] = []  # each "Copy code" that whitespace and a fence follow, and that fence
    ends: list[int] = []
    at = value.find(_COPY)
    while at != -1:
        j = at + len(_COPY)
        while j < len(value) and value[j].isspace():
            j += 1
        if value.startswith(_FENCE, j):
            closes.append(at)
            ends.append(j + 3)
        at = value.find(_COPY, at + 1)
    newlines = [m.start() for m in re.finditer("\n", value)]
    out: list[str] = []
    done = 0
    start = value.find(_FENCE)
    while start != -1:
        k = bisect.bisect_left(closes, start + 3)
        if k == len(closes):
            break
        n = bisect.bisect_left(newlines, start + 3)
        line_end = newlines[n] if n < len(newlines) else len(value)
        if closes[k] < line_end:
            out.append(value[done:start])
            done = ends[k]
            start = value.find(_FENCE, done)
        else:
            start = value.find(_FENCE, start + 1)
    out.append(value[done:])
    return "".join(out)


def html_to_markdown(value: str) -> str:
    """Convert one ShareGPT HTML value to markdown (FastChat's steps with a real converter)."""
    import markdownify

    value = _DIV_SPAN.sub("", value)
    value = markdownify.markdownify(value, heading_style="ATX").strip()
    value = reformat_code(value)
    noise = _REGENERATE.match(value)
    if noise:
        value = value[noise.end() :]
    value = _COPY_CHARS.sub("", value)
    value = remove_empty_copy_code(value)
    return _BLANK_LINES.sub("\n\n", value).strip()


def clean_value(value: str, notes: Counter) -> str:
    """Markdown passes through (except ShareGPT's copy-button noise); HTML is converted."""
    if is_html(value):
        notes["html_converted"] += 1
        return html_to_markdown(value)
    if "Copy code" in value:
        notes["code_fence_fixed"] += 1
        value = remove_empty_copy_code(reformat_code(value))
    if "chars / " in value:
        value = _COPY_CHARS.sub("", value)
    return value
