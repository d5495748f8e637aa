"""A generator of hostile ShareGPT files: every fault the loader must survive, among good records.

Each case is one record written three ways (compact for one-line arrays and JSONL, pretty for
indented arrays) with the reason the loader must give it, or None for a record it must keep. A
corpus interleaves good records with every bad case and writes it in each layout, optionally
gzipped; `cut=True` also cuts the file inside its last record, which must count as
`truncated_record`.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LAYOUTS = ("array_one_line", "array_pretty", "array_pretty_joined", "jsonl")
# The trap of the old `_CODE_LANG` regex: a fence, 50 KB of "Copy code", no closing fence (cubic
# backtracking: 1 KB took 0.2 s, 4 KB 13 s).
CODE_BOMB = "```" + "Copy code" * 5_500


def good(i: int, answer: str = "Paris is the capital of France, by a long way.") -> dict:
    return {
        "id": f"g{i}",
        "conversations": [
            {"from": "human", "value": f"What is the capital of France? ({i})"},
            {"from": "gpt", "value": answer},
        ],
    }


@dataclass(frozen=True)
class Case:
    name: str
    reason: str | None
    render: Callable[[int], tuple[bytes, bytes]]  # index -> (compact, pretty) text of the record


def _from_text(edit: Callable[[str], str], record: Callable[[int], object]) -> Callable:
    """A record serialized compact and pretty, then damaged by the same text edit."""

    def render(i: int) -> tuple[bytes, bytes]:
        rec = record(i)
        return (
            edit(json.dumps(rec, ensure_ascii=False)).encode("utf-8"),
            edit(json.dumps(rec, ensure_ascii=False, indent=2)).encode("utf-8"),
        )

    return render


def _raw(make: Callable[[int], bytes]) -> Callable:
    """A record given as exact bytes (one line), used as is in every layout."""
    return lambda i: (make(i), make(i))


def _bad(i: int) -> dict:
    return good(i) | {"id": f"b{i}"}


def _splice(i: int, insert: bytes, anchor: str) -> bytes:
    text = json.dumps(_bad(i)).encode()
    at = text.index(anchor.encode())
    return text[:at] + insert + text[at:]


CASES = (
    Case("good", None, _from_text(lambda t: t, good)),
    Case("code_bomb", None, _from_text(lambda t: t, lambda i: good(i, CODE_BOMB))),
    Case("stray_quote", "malformed_json", _from_text(lambda t: t.replace('"b', "b", 1), _bad)),
    Case("unquoted_value", "malformed_json", _from_text(lambda t: t.replace('"', "", 1), _bad)),
    Case("trailing_comma", "malformed_json", _from_text(lambda t: t[:-1] + ",}", _bad)),
    Case("single_quotes", "malformed_json", _from_text(lambda t: t.replace('"', "'"), _bad)),
    Case("missing_close", "malformed_json", _from_text(lambda t: t.rstrip("}"), _bad)),
    Case(
        "unterminated_string",
        "malformed_json",
        _from_text(lambda t: t[: t.rindex('"')] + t[t.rindex('"') + 1 :], _bad),
    ),
    Case("not_json", "malformed_json", _raw(lambda i: b"this is not json at all")),
    Case("stray_bracket", "malformed_json", _raw(lambda i: b"}")),
    Case(
        "invalid_utf8_in_string", "invalid_utf8", _raw(lambda i: _splice(i, b"\xff\xfe", "capital"))
    ),
    Case(
        "invalid_utf8_outside",
        "invalid_utf8",
        _raw(lambda i: _splice(i, b"\xc3", '"conversations"')),
    ),
    Case("raw_nul", "nul_byte", _raw(lambda i: _splice(i, b"\x00", "capital"))),
    Case(
        "escaped_nul",
        "nul_byte",
        _from_text(lambda t: t.replace("capital", "cap\\u0000ital"), _bad),
    ),
    Case(
        "lone_surrogate",
        "unpaired_surrogate",
        _from_text(lambda t: t.replace("capital", "cap\\ud800ital"), _bad),
    ),
    Case(
        "too_deep",
        "too_deep",
        _raw(
            lambda i: (
                json.dumps(_bad(i))[:-1].encode()
                + b', "x": '
                + b"[" * 100_000
                + b"]" * 100_000
                + b"}"
            )
        ),
    ),
    Case("a_list", "not_an_object", _from_text(lambda t: t, lambda i: [1, 2, i])),
    Case("a_number", "not_an_object", _raw(lambda i: str(i).encode())),
    Case("null", "not_an_object", _raw(lambda i: b"null")),
    Case("int_id", "bad_id", _from_text(lambda t: t, lambda i: _bad(i) | {"id": i})),
    Case(
        "conversations_string",
        "conversations_not_list",
        _from_text(lambda t: t, lambda i: _bad(i) | {"conversations": "hello"}),
    ),
    Case(
        "turn_without_value",
        "turn_missing_from_or_value",
        _from_text(lambda t: t, lambda i: _bad(i) | {"conversations": [{"from": "human"}]}),
    ),
    Case(
        "number_value",
        "non_string_turn",
        _from_text(
            lambda t: t, lambda i: _bad(i) | {"conversations": [{"from": "human", "value": 3}]}
        ),
    ),
)
BAD = tuple(c for c in CASES if c.reason is not None)


@dataclass
class Corpus:
    path: Path
    records: int  # records in the file, the cut-off one included
    good_ids: list[str]
    dropped: Counter


def _indent(text: bytes, n: int) -> bytes:
    pad = b" " * n
    return b"\n".join(pad + line for line in text.split(b"\n"))


def layout_bytes(fragments: list[tuple[bytes, bytes]], layout: str) -> bytes:
    if layout == "array_one_line":
        return b"[" + b", ".join(c for c, _ in fragments) + b"]"
    if layout == "array_pretty":
        return b"[\n" + b",\n".join(_indent(p, 2) for _, p in fragments) + b"\n]\n"
    if layout == "array_pretty_joined":  # "}, {" between records, as some exporters write
        return b"[\n" + b", ".join(_indent(p, 2) for _, p in fragments) + b"\n]\n"
    if layout == "jsonl":
        return b"".join(c + b"\n" for c, _ in fragments)
    raise ValueError(layout)


def write_corpus(
    folder: Path, layout: str, *, gz: bool = False, cut: bool = False, bad_first: bool = True
) -> Corpus:
    """Every bad case between good records (a bad one first, on the `[` line), in `layout`."""
    cases = [BAD[0]] if bad_first else []
    for n, case in enumerate(BAD):
        cases += [CASES[0], case] if n % 2 else [CASES[0], CASES[1], case]
    cases += [CASES[0]]
    fragments = [case.render(i) for i, case in enumerate(cases)]
    good_ids = [f"g{i}" for i, c in enumerate(cases) if c.reason is None]
    dropped = Counter(c.reason for c in cases if c.reason is not None)
    data = layout_bytes(fragments, layout)
    if cut:
        data = data[: data.rindex(b"What is the capital") + 10]  # inside the last record
        good_ids.pop()
        dropped["truncated_record"] += 1
    name = f"{layout}{'_cut' if cut else ''}.{'jsonl' if layout == 'jsonl' else 'json'}"
    path = folder / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return Corpus(path, len(cases), good_ids, dropped)
