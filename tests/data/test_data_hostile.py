"""Hostile corpora: every good record kept, every bad one counted with its reason, at every step.

The corpora come from `hostile_corpus.py`: each fault case between good records, in every layout
(JSON array on one line, pretty-printed array, JSONL), gzipped or not, whole or cut off.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time

import pytest
from hostile_corpus import CASES, CODE_BOMB, LAYOUTS, good, layout_bytes, write_corpus

from arenaflow.data import load
from arenaflow.data.clean import CleanOptions, clean_file
from arenaflow.data.load import load_raw
from arenaflow.data.text import reformat_code, remove_empty_copy_code


def kept_ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def check_raw(corpus, tmp_path):
    out = tmp_path / "raw.jsonl"
    stats = load_raw(str(corpus.path), str(out))
    assert kept_ids(out) == corpus.good_ids
    assert dict(stats.dropped) == dict(corpus.dropped)
    assert stats.input == corpus.records == stats.kept + sum(stats.dropped.values())
    return stats, out


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_record_is_kept_or_counted_in_every_layout(tmp_path, layout, gz, cut):
    stats, _ = check_raw(write_corpus(tmp_path, layout, gz=gz, cut=cut), tmp_path)
    assert stats.stream.truncated is cut
    assert {c.reason for c in CASES if c.reason} <= set(stats.dropped)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_records_that_straddle_the_read_buffer_resync_the_same(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(load, "CHUNK_CHARS", 997)
    check_raw(write_corpus(tmp_path, layout, cut=True, bad_first=False), tmp_path)


def test_a_gzip_stream_cut_short_counts_its_tail(tmp_path):
    lines = b"".join(json.dumps(good(i)).encode() + b"\n" for i in range(2000))
    data = gzip.compress(lines)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "raw.jsonl"
    stats = load_raw(str(path), str(out))
    assert 0 < stats.kept < 2000 and stats.dropped == {"truncated_record": 1}
    assert kept_ids(out) == [f"g{i}" for i in range(stats.kept)]


def test_a_one_line_array_goes_on_after_a_bad_first_record(tmp_path):
    """Before: the bad record on the `[` line swallowed the rest of the file as "truncated"."""
    records = [b'{"id": x0, "conversations": []}'] + [json.dumps(good(i)).encode() for i in (1, 2)]
    path = tmp_path / "one_line.json"
    path.write_bytes(layout_bytes([(r, r) for r in records], "array_one_line"))
    out = tmp_path / "raw.jsonl"
    stats = load_raw(str(path), str(out))
    assert kept_ids(out) == ["g1", "g2"] and stats.dropped == {"malformed_json": 1}
    assert not stats.stream.truncated


@pytest.mark.timeout(120)  # before: hours in the old regex, so fail rather than hang
def test_cleaning_accounts_for_every_record_and_the_code_bomb_is_fast(tmp_path):
    _, raw = check_raw(write_corpus(tmp_path, "array_one_line"), tmp_path)
    start = time.perf_counter()
    stats = clean_file(str(raw), str(tmp_path / "clean.jsonl"), CleanOptions(minhash=False))
    assert time.perf_counter() - start < 30  # before: the first code bomb ran for hours
    assert stats.input == len(kept_ids(raw)) == stats.kept + sum(stats.dropped.values())
    assert kept_ids(tmp_path / "clean.jsonl") == kept_ids(raw)  # the code bombs are kept too


def test_cleaning_counts_lines_the_loader_would_have_refused(tmp_path):
    rows = [
        json.dumps(good(0)).encode(),
        b'{"id": broken',
        json.dumps(good(1)).replace("capital", "cap\\ud800ital").encode(),
        json.dumps(good(2)).replace("capital", "cap\udcffital").encode("utf-8", "surrogateescape"),
        b"[1, 2]",
        json.dumps({"id": "x", "conversations": "no"}).encode(),
        b"[" * 50_000 + b"]" * 50_000,
        json.dumps(good(3, "A second answer, long enough to keep.")).encode(),
    ]
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "clean.jsonl"
    stats = clean_file(str(raw), str(out), CleanOptions(minhash=False), num_workers=1)
    assert stats.input == 8 and stats.kept == 2
    assert stats.dropped == {
        "malformed_json": 2,
        "unpaired_surrogate": 1,
        "invalid_utf8": 1,
        "not_an_object": 1,
        "conversations_not_list": 1,
    }
    assert kept_ids(out) == ["g0", "g3"]


def test_a_record_that_defeats_the_html_parser_is_dropped_as_timeout(tmp_path):
    slow = good(1, '<div a="<' * 12_000)  # ~4 s in BeautifulSoup's html.parser, growing as n**2
    rows = [good(0), slow, good(2, "A second answer, long enough to keep.")]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = CleanOptions(minhash=False, record_seconds=0.3)
    stats = clean_file(str(raw), str(tmp_path / "clean.jsonl"), opts, num_workers=2, chunk_size=1)
    assert stats.dropped == {"timeout": 1} and stats.kept == 2 and stats.input == 3


OLD_CODE_LANG = re.compile(r"```\s*(.*?)(?:Copy code)+(.+?)\s*?```", re.DOTALL)
OLD_EMPTY_COPY_CODE = re.compile(r"```(.*?)Copy code\s*```")


def test_copy_code_scans_match_fastchats_regexes():
    rng = random.Random(0)
    alphabet = ["`", "```", "Copy code", " ", "\n", "a", "py"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert reformat_code(text) == OLD_CODE_LANG.sub(r"```\g<1>\n\g<2>\n```", text), text
        assert remove_empty_copy_code(text) == OLD_EMPTY_COPY_CODE.sub("", text), text


@pytest.mark.parametrize(
    "text",
    [CODE_BOMB, "```" + "Copy code" * 6_000, "```" * 17_000, "``` Copy code" * 4_000 + "`"],
    ids=["mixed", "one_fence", "fences", "open"],
)
@pytest.mark.timeout(60)
def test_copy_code_scans_take_linear_time_on_50kb(text):
    start = time.perf_counter()
    remove_empty_copy_code(reformat_code(text))
    assert time.perf_counter() - start < 1.0  # before: "```" + 1 KB of "Copy code" took 12 s
