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

import bisect
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
_SURROGATE = re.compile("[\ud800-\udfff]")
_BLANK_LINES = re.compile(r"\n{3,}")
# FastChat's filter_wrong_format: a "1." list that restarts at "1." before any "2".
_WRONG_LIST = re.compile(r"\n1\. [^2]*\n1\. ")


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


# -- text -----------------------------------------------------------------------------------------
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


# -- MinHash --------------------------------------------------------------------------------------
# Everything is uint64 arithmetic that wraps on purpose: polynomial word hashes from prefix sums,
# and one-permutation hashing for the signature (no per-word Python loop, one hash per shingle).
_P = np.uint64(0x100000001B3)  # odd, so it has an inverse mod 2**64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_MIX = np.uint64(0x9E3779B97F4A7C15)


_pow_tables: dict[str, np.ndarray] = {}


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64, from a table grown on demand (shared by all calls)."""
    key = str(int(base))
    table = _pow_tables.get(key)
    if table is None or len(table) < n:
        size = max(n, 1 << 15)
        table = np.full(size, base, dtype=np.uint64)
        table[0] = 1
        with np.errstate(over="ignore"):
            table = np.cumprod(table, dtype=np.uint64)
        _pow_tables[key] = table
    return table[:n]


def word_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of every whitespace-separated word of `text`, lower-cased, vectorized."""
    raw = np.frombuffer(text.lower().encode("utf-8", "ignore"), dtype=np.uint8)
    n = len(raw)
    if n == 0:
        return np.zeros(1, dtype=np.uint64)
    ws = raw <= 32  # space and control characters separate words
    word = ~ws
    starts = np.flatnonzero(word & np.concatenate(([True], ws[:-1])))
    ends = np.flatnonzero(word & np.concatenate((ws[1:], [True]))) + 1
    if len(starts) == 0:
        return np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(raw.astype(np.uint64) * _powers(_P, n), dtype=np.uint64, out=prefix[1:])
        return (prefix[ends] - prefix[starts]) * _powers(_P_INV, n)[starts]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads structured 64-bit hashes over all bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_EMPTY = np.uint64(np.iinfo(np.uint64).max)
_ROTATE = np.uint64(0x9E3779B97F4A7C15)


def minhash_signature(text: str, num_perm: int = 128, shingle: int = 5) -> np.ndarray:
    """A MinHash signature of the word `shingle`-grams of `text` (lower-cased), `num_perm` uint64s.

    One-permutation hashing with rotation densification (Shrivastava & Li, 2014): every shingle
    is hashed once and lands in one of `num_perm` bins, whose minimum is that bin's value; empty
    bins borrow from the next filled bin. Two signatures agree per position with probability close
    to the Jaccard similarity, like classic MinHash, at 1/num_perm of its hashing cost.
    """
    hv = word_hashes(text)
    n = max(1, len(hv) - shingle + 1)
    with np.errstate(over="ignore"):
        h = hv[:n].copy()
        for k in range(1, min(shingle, len(hv))):
            h = h * _MIX + hv[k : k + n]
        x = _mix64(h)
        perm = np.uint64(num_perm)
        sig = np.full(num_perm, _EMPTY, dtype=np.uint64)
        np.minimum.at(sig, (x % perm).astype(np.intp), x // perm)
        empty = sig == _EMPTY
        if empty.any():
            filled = np.flatnonzero(~empty)
            idx = np.arange(num_perm)
            nxt = filled[np.searchsorted(filled, idx) % len(filled)]
            dist = ((nxt - idx) % num_perm).astype(np.uint64)
            sig = sig[nxt] + dist * _ROTATE
    return sig


def _signature_text(conv: Sequence[dict[str, str]], max_chars: int) -> str:
    return "\n".join(t["value"] for t in conv)[:max_chars]


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
                _signature_text(conv, opts.minhash_max_chars), opts.num_perm, opts.shingle
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


class NearDuplicateIndex:
    """MinHash LSH banding, keeping the first of each near-duplicate group.

    The (bands, rows) split is datasketch's optimum for the threshold (taken from `MinHashLSH`);
    the buckets are plain dicts of band bytes, since building datasketch `MinHash` objects per
    record costs more than the whole signature. Candidates are confirmed on the signature.
    """

    def __init__(self, threshold: float, num_perm: int) -> None:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.threshold = threshold
        self.bands, self.rows = lsh.b, lsh.r
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.sigs: list[np.ndarray] = []

    def seen(self, sig: np.ndarray) -> bool:
        """True when a kept record is at least `threshold` similar; otherwise index this one."""
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        checked: set[int] = set()
        for bucket, key in zip(self.buckets, keys, strict=True):
            for other in bucket.get(key, ()):
                if other not in checked:
                    checked.add(other)
                    if float(np.mean(self.sigs[other] == sig)) >= self.threshold:
                        return True
        idx = len(self.sigs)
        self.sigs.append(sig)
        for bucket, key in zip(self.buckets, keys, strict=True):
            bucket.setdefault(key, []).append(idx)
        return False


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
