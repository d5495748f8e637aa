"""Clean ShareGPT conversations: FastChat's rules, plus near-duplicate and language filtering, fast.

Per-record work (role fixes, HTML -> markdown, blocked words, empty answers, list-numbering check,
language ID, MinHash signature) runs in worker processes over chunks of raw JSONL lines; the
order-dependent dedup (by id, by first exchange, MinHash/LSH near-duplicates) runs in the parent
over the results in input order, so the output is deterministic whatever the worker count.
Markdown input passes through unchanged; only values that are HTML pay for conversion.
Every dropped record is counted under one reason; `kept + sum(dropped) == input`, whatever the
input file holds (a line that does not parse or is not UTF-8 is a record with its reason).

System turns: ShareGPT has a few dozen, mostly pasted instructions. `data.system_turns=drop`
(default) removes them and counts them in the notes, so the model learns its own template's
default system prompt; `keep` keeps a leading one (a system turn anywhere else is `wrong_format`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import signal
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arenaflow import io
from arenaflow.data.load import validate_record
from arenaflow.data.minhash import NearDuplicateIndex, minhash_signature, signature_text
from arenaflow.data.text import clean_value
from arenaflow.textfilters import blocked_words

log = logging.getLogger(__name__)

ROLE_ALIASES = {
    "human": "human",
    "user": "human",
    "gpt": "gpt",
    "assistant": "gpt",
    "chatgpt": "gpt",
    "bing": "gpt",
    "bard": "gpt",
    "system": "system",
}

# FastChat's filter_wrong_format: a "1." list that restarts at "1." before any "2".
_WRONG_LIST = re.compile(r"\n1\. [^2]*\n1\. ")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class CleanOptions:
    """The cleaning rules, from `cfg.data` (picklable: it travels to the worker processes)."""

    blocked_words: tuple[str, ...] = ("openai", "chatgpt")
    blocked_responses: tuple[str, ...] = ("Too many requests in 1 hour. Try again later.",)
    min_chars: int = 16
    system_turns: str = "drop"
    keep_lang: tuple[str, ...] = ()
    skip_lang: tuple[str, ...] = ()
    wrong_list_filter: bool = True
    minhash: bool = True
    minhash_threshold: float = 0.9
    num_perm: int = 128
    shingle: int = 5
    minhash_max_chars: int = 5_000
    record_seconds: float | None = 30.0  # per-record limit in worker processes (see _time_limit)

    @classmethod
    def from_cfg(cls, data_cfg: Any) -> CleanOptions:
        mh = data_cfg.minhash
        if data_cfg.system_turns not in ("drop", "keep"):
            raise ValueError(f"data.system_turns={data_cfg.system_turns!r}: use drop or keep")
        return cls(
            blocked_words=tuple(data_cfg.blocked_words or ()),
            blocked_responses=tuple(data_cfg.blocked_responses or ()),
            min_chars=int(data_cfg.min_chars),
            system_turns=str(data_cfg.system_turns),
            keep_lang=tuple(data_cfg.keep_lang or ()),
            skip_lang=tuple(data_cfg.skip_lang or ()),
            wrong_list_filter=bool(data_cfg.get("wrong_list_filter", True)),
            minhash=bool(mh.enabled),
            minhash_threshold=float(mh.threshold),
            num_perm=int(mh.num_perm),
            shingle=int(mh.shingle),
            minhash_max_chars=int(mh.get("max_chars", 5_000)),
        )


@dataclass
class CleanStats:
    input: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "notes": dict(sorted(self.notes.items())),
        }


# -- one record -----------------------------------------------------------------------------------
def has_wrong_list_numbering(value: str) -> bool:
    """FastChat's filter_wrong_format rule, with a substring pre-check before the regex."""
    return value.count("\n1. ") >= 2 and _WRONG_LIST.search(value) is not None


def clean_record(
    record: dict[str, Any], opts: CleanOptions, notes: Counter
) -> tuple[str | None, dict]:
    """(drop reason or None, cleaned FastChat record). Order-independent rules only."""
    if record.get("plugins") is not None:
        return "plugins", record
    turns = []
    for t in record["conversations"]:
        role = ROLE_ALIASES.get(t["from"].strip().lower())
        if role is None:
            return "wrong_format", record
        if role == "system":
            if opts.system_turns == "drop":
                notes["system_turns_removed"] += 1
                continue
            if turns:  # system_turns=keep: only a leading system turn fits the format
                return "wrong_format", record
        elif role != t["from"]:
            notes["role_alias_mapped"] += 1
        turns.append({"from": role, "value": t["value"]})

    head = turns[:1] if turns and turns[0]["from"] == "system" else []
    body = turns[len(head) :]
    if body and body[0]["from"] != "human":
        body = body[1:]
        notes["leading_non_human_removed"] += 1
    if body and body[-1]["from"] == "human":
        body = body[:-1]
    if len(body) <= 1:
        return "too_short", record

    blocked = blocked_words(opts.blocked_words)
    responses = {r.strip() for r in opts.blocked_responses}
    out: list[dict[str, str]] = []
    chars = 0
    for i, t in enumerate(body):
        if t["from"] != ("human", "gpt")[i % 2]:
            return "wrong_format", record
        value = t["value"]
        if blocked.search(value):
            return "blocked_words", record
        if t["from"] == "gpt" and value.strip() in responses:
            return "blocked_response", record
        try:
            value = clean_value(value, notes)
        except (RecursionError, AssertionError, ValueError) as e:
            log.debug("record %s: converter failed: %s", record.get("id"), e)
            return "parse_error", record
        except Exception as e:  # bs4's ParserRejectedMarkup and friends
            log.debug("record %s: converter failed: %r", record.get("id"), e)
            return "parse_error", record
        stripped = value.strip()
        if not stripped or not stripped[0].isprintable():
            notes["stopped_at_empty_answer"] += 1
            break
        chars += len(value)
        out.append({"from": t["from"], "value": value})
    out = out[: len(out) // 2 * 2]
    if chars < opts.min_chars or not out:
        return "too_short", record
    if opts.wrong_list_filter and any(has_wrong_list_numbering(t["value"]) for t in out):
        return "wrong_list_numbering", record
    if opts.keep_lang or opts.skip_lang:
        lang = detect_language(out)
        if (opts.keep_lang and lang not in opts.keep_lang) or lang in opts.skip_lang:
            notes[f"lang_{lang}"] += 1
            return "language", record
    return None, {"id": record["id"], "conversations": head + out}


def detect_language(turns: Sequence[dict[str, str]], max_chars: int = 2000) -> str:
    import langid

    text = "\n".join(t["value"] for t in turns)[:max_chars]
    return langid.classify(text)[0]


def dedup_key(conv: Sequence[dict[str, str]]) -> bytes:
    """FastChat's value-duplicate key (first human, first gpt text), as a short digest."""
    body = [t for t in conv if t["from"] != "system"]
    return hashlib.blake2b(
        (body[0]["value"] + "\x00" + body[1]["value"]).encode(), digest_size=16
    ).digest()


# -- workers --------------------------------------------------------------------------------------
Result = tuple[str | None, str | None, bytes | None, np.ndarray | None, str | None]


def clean_lines(lines: Sequence[str], opts: CleanOptions) -> tuple[list[Result], Counter]:
    """Worker task: raw JSONL lines -> (reason, output line, dedup key, signature, id) + notes."""
    notes: Counter = Counter()
    out: list[Result] = []
    for line in lines:
        reason, record = _parse_line(line)
        if reason is not None:
            out.append((reason, None, None, None, None))
            continue
        rid = record["id"]
        try:
            with _time_limit(opts.record_seconds):
                reason, cleaned = clean_record(record, opts, notes)
        except _RecordTimeout:
            log.warning("record %s: cleaning ran past %ss, dropped", rid, opts.record_seconds)
            reason = "timeout"
        if reason is not None:
            out.append((reason, None, None, None, rid))
            continue
        conv = cleaned["conversations"]
        sig = (
            minhash_signature(
                signature_text(conv, opts.minhash_max_chars), opts.num_perm, opts.shingle
            )
            if opts.minhash
            else None
        )
        text = json.dumps(cleaned, ensure_ascii=False)
        if _SURROGATE.search(text):
            out.append(("unpaired_surrogate", None, None, None, rid))
            continue
        out.append((None, text, dedup_key(conv), sig, rid))
    return out, notes


class _RecordTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that the converters' `except Exception` let it by."""


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Stop one record's cleaning after `seconds`, in worker processes only.

    Our own patterns are linear, but the HTML parser under markdownify is not (48 KB of
    `<div a="<` takes ~4 s, and it grows with the square). A pool worker owns its main thread
    and SIGALRM; the parent process (CLI, Dagster, pytest-timeout) may not, so it runs unbounded.
    """
    import multiprocessing as mp

    if not seconds or mp.parent_process() is None or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _RecordTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _parse_line(line: str) -> tuple[str | None, Any]:
    """(reason or None, record): any JSONL file may come in, not only the loader's output."""
    if _SURROGATE.search(line):  # read with surrogateescape: bytes that are not UTF-8
        return "invalid_utf8", None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return "malformed_json", None
    return validate_record(record), record


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        if line.strip():
            chunk.append(line)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _star_clean(args: tuple[list[str], CleanOptions]) -> tuple[list[Result], Counter]:
    return clean_lines(*args)


def iter_results(
    lines: Iterable[str], opts: CleanOptions, *, num_workers: int = 2, chunk_size: int = 256
) -> Iterator[tuple[list[Result], Counter]]:
    """Per-chunk results in input order, from `num_workers` processes (1 = in this process)."""
    tasks = ((chunk, opts) for chunk in _chunks(lines, chunk_size))
    if num_workers <= 1:
        yield from map(_star_clean, tasks)
        return
    with pool_context().Pool(num_workers) as pool:
        yield from pool.imap(_star_clean, tasks)


def pool_context() -> Any:
    """fork when this process runs no other Python threads (cheap start), else spawn.

    Forking a process that runs threads (Dagster's executor, MLflow's async logging) can copy a
    held lock into the child; spawn pays a fresh interpreter per worker instead.
    """
    import multiprocessing as mp
    import threading

    if threading.active_count() == 1 and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def clean_lines_to_file(
    lines: Iterable[str],
    write: Any,
    opts: CleanOptions,
    *,
    num_workers: int = 2,
    chunk_size: int = 256,
    total: int | None = None,
) -> CleanStats:
    """Clean raw JSONL lines and write kept records through `write(line)`; returns the counts."""
    from tqdm import tqdm

    stats = CleanStats()
    seen_ids: set[str] = set()
    seen_keys: set[bytes] = set()
    near = NearDuplicateIndex(opts.minhash_threshold, opts.num_perm) if opts.minhash else None
    bar = tqdm(total=total, desc="sharegpt_clean", unit="rec", mininterval=2.0)
    for results, notes in iter_results(lines, opts, num_workers=num_workers, chunk_size=chunk_size):
        stats.notes.update(notes)
        for reason, line, key, sig, rid in results:
            stats.input += 1
            if reason is None and rid in seen_ids:
                reason = "duplicate_id"
            elif reason is None and key in seen_keys:
                reason = "duplicate_value"
            elif reason is None and near is not None and near.seen(sig):
                reason = "near_duplicate"
            if reason is not None:
                stats.dropped[reason] += 1
                continue
            seen_ids.add(rid)
            seen_keys.add(key)
            stats.kept += 1
            write(line + "\n")
        bar.update(len(results))
    bar.close()
    log.info("clean: %d in, %d kept, dropped %s", stats.input, stats.kept, dict(stats.dropped))
    return stats


def clean_file(
    in_uri: str,
    out_uri: str,
    opts: CleanOptions,
    *,
    num_workers: int = 2,
    chunk_size: int = 256,
    total: int | None = None,
) -> CleanStats:
    """Clean a raw FastChat JSONL file (any fsspec URI) into another."""
    import fsspec

    with (
        fsspec.open(in_uri, "r", encoding="utf-8", errors="surrogateescape") as fin,
        io.open_atomic(out_uri) as fout,
    ):
        return clean_lines_to_file(
            fin,
            fout.write,
            opts,
            num_workers=num_workers,
            chunk_size=chunk_size,
            total=total,
        )
