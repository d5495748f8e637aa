"""An answer's style counts, in FastChat's `conv_metadata` layout (the style-control covariates).

Counted once when answers are written (`evaluate.answers`) and when battles are built
(`rating.battles`): answer tokens (words and punctuation, the same for every model, so lengths
compare across tokenizers), markdown headers, list items and bold spans outside code blocks
(FastChat's `add_markdown_info` counters), and code blocks. No dependency beyond `re`, so the
answer writer does not load the rating stage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# conv_metadata keys of each side
META_A = ("sum_assistant_a_tokens", "header_count_a", "list_count_a", "bold_count_a")
META_B = ("sum_assistant_b_tokens", "header_count_b", "list_count_b", "bold_count_b")

# Every pattern is linear: anchored line starts, or a negated class that cannot backtrack.
_CODE_BLOCK = re.compile(r"```[^`]*```")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_HEADER = re.compile(r"^(#{1,6})\s", re.MULTILINE)
_ORDERED = re.compile(r"^\s*\d+\.\s", re.MULTILINE)
_UNORDERED = re.compile(r"^\s*[-*+]\s", re.MULTILINE)
_BOLD_STAR = re.compile(r"\*\*[^*\n]+\*\*")
_BOLD_UNDER = re.compile(r"__[^_\n]+__")


def answer_style(text: str) -> dict[str, Any]:
    """One answer's style counts (FastChat's markdown counters; tokens are words and punctuation,
    the same for every model, so lengths compare across tokenizers). Code blocks are removed
    before markdown is counted, as FastChat does; their number is kept too."""
    text = text or ""
    prose = _CODE_BLOCK.sub("", text)
    headers = {f"h{n}": 0 for n in range(1, 7)}
    for m in _HEADER.finditer(prose):
        headers[f"h{len(m.group(1))}"] += 1
    return {
        "tokens": len(_TOKEN.findall(text)),
        "header_count": headers,
        "list_count": {
            "ordered": len(_ORDERED.findall(prose)),
            "unordered": len(_UNORDERED.findall(prose)),
        },
        "bold_count": {"**": len(_BOLD_STAR.findall(prose)), "__": len(_BOLD_UNDER.findall(prose))},
        "code_blocks": len(_CODE_BLOCK.findall(text)),
    }


def _sum_styles(styles: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several answers' counts added up (the turns a judge saw)."""
    out: dict[str, Any] = {"tokens": 0, "code_blocks": 0}
    for s in styles:
        out["tokens"] += int(s.get("tokens", 0))
        out["code_blocks"] += int(s.get("code_blocks", 0))
        for key in ("header_count", "list_count", "bold_count"):
            acc = out.setdefault(key, {})
            for k, v in (s.get(key) or {}).items():
                acc[k] = acc.get(k, 0) + int(v)
    return out


def conv_metadata(a: Iterable[dict[str, Any]], b: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """FastChat's `conv_metadata` of a battle from the style counts of each side's answer turns."""
    meta: dict[str, Any] = {}
    for side, styles in (("a", a), ("b", b)):
        s = _sum_styles(styles)
        meta[f"sum_assistant_{side}_tokens"] = s["tokens"]
        for key in ("header_count", "list_count", "bold_count"):
            meta[f"{key}_{side}"] = s.get(key, {})
        meta[f"code_block_count_{side}"] = s["code_blocks"]
    return meta


def tally(value: Any) -> float:
    if isinstance(value, dict):
        return float(sum(value.values()))
    return float(value)


def has_style(meta: Any) -> bool:
    """Whether a battle's conv_metadata holds every feature of both sides."""
    return isinstance(meta, dict) and all(k in meta for k in (*META_A, *META_B))
