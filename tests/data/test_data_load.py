"""Streaming loader: truncated arrays, JSONL, gzip, malformed records and schema reasons."""

from __future__ import annotations

import gzip
import json

from arenaflow.data.load import Unreadable, iter_source, load_raw

GOOD = [
    {
        "id": f"r{i}",
        "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}],
    }
    for i in range(5)
]


def test_truncated_json_array_recovers_every_complete_record(tmp_path):
    text = json.dumps(GOOD, indent=2)
    cut = text[: text.rindex('"q4"') + 2]  # cut inside the last record
    path = tmp_path / "cut.json"
    path.write_text(cut)
    values, report = iter_source(str(path))
    *records, tail = list(values)
    assert [v["id"] for v in records] == ["r0", "r1", "r2", "r3"]
    assert tail == Unreadable("truncated_record", cut.index('{\n    "id": "r4"'))
    assert report.truncated and report.truncated_tail_chars > 0
    assert report.truncated_at_char == cut.index('{\n    "id": "r4"')
    stats = load_raw(str(path), str(tmp_path / "out.jsonl"))
    assert stats.input == 5 and stats.kept == 4 and stats.dropped == {"truncated_record": 1}


def test_jsonl_gzip_and_limit(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in GOOD:
            f.write(json.dumps(r) + "\n")
    values, report = iter_source(str(path), limit=3)
    assert [v["id"] for v in values] == ["r0", "r1", "r2"]
    assert report.limit_reached and not report.truncated


def test_malformed_record_mid_file_is_skipped_and_counted(tmp_path):
    lines = [json.dumps(r) for r in GOOD]
    lines[2] = lines[2][:-5] + "oops"  # broken JSON in the middle of a JSONL file
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats = load_raw(str(path), str(tmp_path / "out.jsonl"))
    assert stats.kept == 4 and stats.input == 5
    assert stats.dropped == {"malformed_json": 1}
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["r0", "r1", "r3", "r4"]


def test_schema_reasons_are_counted_not_fatal(tmp_path):
    bad = [
        GOOD[0],
        ["not", "an", "object"],
        {"id": 7, "conversations": []},
        {"id": "", "conversations": []},
        {"id": "x1", "conversations": "hello"},
        {"id": "x2", "conversations": [{"from": "human"}]},
        {"id": "x3", "conversations": [{"from": "human", "value": 3}]},
        GOOD[1],
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(bad, indent=1))
    out = tmp_path / "raw.jsonl"
    stats = load_raw(str(path), str(out))
    assert stats.as_dict() == {
        "input": 8,
        "kept": 2,
        "dropped": {
            "bad_id": 2,
            "conversations_not_list": 1,
            "non_string_turn": 1,
            "not_an_object": 1,
            "turn_missing_from_or_value": 1,
        },
        "truncated": False,
        "truncated_at_char": None,
        "truncated_tail_chars": 0,
    }
    assert out.read_text().count("\n") == 2


def test_package_source_streams_with_limit(tmp_path):
    stats = load_raw("package", str(tmp_path / "raw.jsonl"), limit=50)
    assert stats.kept == 50 and stats.input == 50 and not stats.stream.truncated


def test_missing_source_names_the_fix(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="data.source"):
        load_raw(str(tmp_path / "nope.json"), str(tmp_path / "raw.jsonl"))


def test_malformed_record_in_pretty_array_resyncs_at_next_record(tmp_path):
    text = json.dumps(GOOD, indent=2).replace('"id": "r1"', '"id": r1', 1)
    path = tmp_path / "bad.json"
    path.write_text(text)
    values, report = iter_source(str(path))
    assert [v["id"] if isinstance(v, dict) else v.reason for v in values] == [
        "r0",
        "malformed_json",
        "r2",
        "r3",
        "r4",
    ]
    assert report.malformed == 1 and not report.truncated
