"""Cleaning rules on handmade records: one test per rule, plus accounting and determinism."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

from arenaflow.data.clean import CleanOptions, clean_file, clean_record
from arenaflow.data.minhash import minhash_signature
from arenaflow.data.text import clean_value, html_to_markdown

OPTS = CleanOptions(minhash=False)
ANSWER = "Paris is the capital of France."


def conv(*turns, rid="c1", **extra):
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def clean(record, opts=OPTS):
    notes = Counter()
    reason, out = clean_record(record, opts, notes)
    return reason, out, notes


HTML = (
    '<div class="markdown prose w-full"><p>1 / 1</p><p>Here is <strong>code</strong>:</p>'
    '<pre><div class="bg-black"><div class="flex"><span>python</span><button>Copy code</button>'
    '</div><div><code class="hljs">print(x_y)\n</code></div></div></pre>'
    "<p></p><p></p><ol><li>one</li><li>two</li></ol><p>Copy12 chars / 3 words</p></div>"
)


def test_html_becomes_markdown_with_fenced_code():
    assert html_to_markdown(HTML) == (
        "Here is **code**:\n\n```python\nprint(x_y)\n```\n\n1. one\n2. two"
    )


def test_markdown_passes_through_unchanged():
    md = "| a | b |\n| --- | --- |\n| x<br>y | 2 < 3 |\n\n```html\n<div>kept</div>\n```"
    notes = Counter()
    assert clean_value(md, notes) == md
    assert notes["html_converted"] == 0


def test_sharegpt_copy_code_in_markdown_is_fenced():
    assert clean_value("```pythonCopy codeprint(1)```", Counter()) == "```python\nprint(1)\n```"


def test_roles_aliases_and_leading_trailing_turns():
    reason, out, notes = clean(
        conv(
            ("gpt", "Hi, I am a leftover greeting."),
            ("user", "What is the capital of France?"),
            ("chatgpt", ANSWER),
            ("human", "And of Spain?"),
            ("bard", "Madrid."),
            ("human", "a trailing question"),
        )
    )
    assert reason is None
    assert [t["from"] for t in out["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert out["conversations"][1]["value"] == ANSWER
    assert notes["leading_non_human_removed"] == 1 and notes["role_alias_mapped"] == 3


def test_non_alternating_roles_are_wrong_format():
    reason, *_ = clean(conv(("human", "q1 long enough"), ("human", "q2"), ("gpt", ANSWER)))
    assert reason == "wrong_format"
    reason, *_ = clean(conv(("human", "q"), ("wizard", ANSWER)))
    assert reason == "wrong_format"


def test_system_turns_drop_or_keep():
    record = conv(("system", "Be brief."), ("human", "Capital of France?"), ("gpt", ANSWER))
    reason, out, notes = clean(record)
    assert reason is None and out["conversations"][0]["from"] == "human"
    assert notes["system_turns_removed"] == 1
    reason, out, _ = clean(record, replace(OPTS, system_turns="keep"))
    assert reason is None
    assert [t["from"] for t in out["conversations"]] == ["system", "human", "gpt"]
    mid = conv(("human", "Capital?"), ("system", "x"), ("gpt", ANSWER))
    assert clean(mid, replace(OPTS, system_turns="keep"))[0] == "wrong_format"


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ((("human", "Who made you?"), ("gpt", "I was trained by OpenAI.")), "blocked_words"),
        ((("human", "Are you CHATGPT?"), ("gpt", ANSWER)), "blocked_words"),
        (
            (("human", "Tell me"), ("gpt", "Too many requests in 1 hour. Try again later.")),
            "blocked_response",
        ),
        ((("human", "Hi"), ("gpt", "Yo")), "too_short"),
        ((("human", "Only a question, no answer"),), "too_short"),
        ((("human", "Q?"), ("gpt", "   ")), "too_short"),
    ],
)
def test_drop_reasons(turns, reason):
    assert clean(conv(*turns))[0] == reason


def test_empty_or_unprintable_answer_stops_and_keeps_whole_pairs():
    reason, out, notes = clean(
        conv(
            ("human", "What is the capital of France?"),
            ("gpt", ANSWER),
            ("human", "And Spain?"),
            ("gpt", "\x00binary junk"),
            ("human", "more"),
            ("gpt", "more answers"),
        )
    )
    assert reason is None
    assert [t["value"] for t in out["conversations"]] == ["What is the capital of France?", ANSWER]
    assert notes["stopped_at_empty_answer"] == 1


def test_plugins_and_wrong_list_numbering():
    plugin = conv(("human", "Search flights"), ("gpt", ANSWER), plugins=["kayak"])
    assert clean(plugin)[0] == "plugins"
    listy = conv(("human", "Steps?"), ("gpt", "Steps:\n1. open\n1. close\n3. done"))
    assert clean(listy)[0] == "wrong_list_numbering"
    assert clean(listy, replace(OPTS, wrong_list_filter=False))[0] is None
    good = conv(("human", "Steps?"), ("gpt", "Steps:\n1. open\n2. close"))
    assert clean(good)[0] is None


def test_deep_html_is_a_parse_error_not_a_crash():
    deep = "<p>" + "<b>" * 4000 + "x" + "</b>" * 4000 + "</p>"
    assert clean(conv(("human", "Render this"), ("gpt", deep)))[0] == "parse_error"


def test_language_filter():
    fr = conv(
        ("human", "Quelle est la capitale de la France et pourquoi est-elle si célèbre ?"),
        ("gpt", "La capitale de la France est Paris, une ville connue pour ses musées."),
    )
    en = conv(("human", "What is the capital of France and why is it famous?"), ("gpt", ANSWER))
    keep_en = replace(OPTS, keep_lang=("en",))
    assert clean(fr, keep_en)[0] == "language"
    assert clean(en, keep_en)[0] is None
    assert clean(fr, replace(OPTS, skip_lang=("fr",)))[0] == "language"


def test_minhash_separates_near_duplicates_from_different_texts():
    base = " ".join(f"sentence {i} of a long answer about topic {i % 9}." for i in range(80))
    a = minhash_signature(base + "alpha", 128, 5)
    b = minhash_signature(base + "beta", 128, 5)
    c = minhash_signature(" ".join(f"pasta recipe {i} needs salt" for i in range(80)), 128, 5)
    assert (a == b).mean() > 0.9
    assert (a == c).mean() < 0.1
    words = [f"w{i}" for i in range(2000)]
    x, y = " ".join(words[:1500]), " ".join(words[500:])  # Jaccard of shingles ~ 0.5
    assert 0.35 < (minhash_signature(x) == minhash_signature(y)).mean() < 0.65


def _records():
    text = " ".join(f"Photosynthesis step {i} moves energy along chain {i % 7}." for i in range(60))
    return [
        conv(("human", "Explain photosynthesis"), ("gpt", text), rid="a"),
        conv(("human", "Explain photosynthesis"), ("gpt", text), rid="a"),  # same id
        conv(("human", "Explain photosynthesis"), ("gpt", text), rid="b"),  # same first exchange
        conv(("human", "Explain photosynthesis please"), ("gpt", text + "Done."), rid="c"),  # near
        conv(("human", "What is the capital of France?"), ("gpt", ANSWER), rid="d"),
        conv(("human", "Hi"), ("gpt", "Yo"), rid="e"),
        conv(("human", "Render"), ("gpt", "<p>" + "<i>" * 4000 + "</p>"), rid="f"),
        {"id": "g", "conversations": [{"from": "human", "value": "Tell me about OpenAI"}]},
    ] + [
        conv(
            ("human", f"Question number {i} about topic {i * 7}?"),
            ("gpt", f"Answer {i}: " + ANSWER),
            rid=f"n{i}",
        )
        for i in range(40)
    ]


def _write(tmp_path, records):
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_clean_file_accounts_for_every_record(tmp_path):
    raw = _write(tmp_path, _records())
    stats = clean_file(raw, str(tmp_path / "clean.jsonl"), CleanOptions(), num_workers=1)
    assert stats.input == 48
    assert stats.kept + sum(stats.dropped.values()) == stats.input
    assert stats.dropped == {
        "duplicate_id": 1,
        "duplicate_value": 1,
        "near_duplicate": 1,
        "too_short": 2,
        "parse_error": 1,
    }
    kept = [json.loads(x) for x in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept[:2]] == ["a", "d"]
    assert len(kept) == stats.kept == 42


def test_parallel_output_is_identical_and_ordered(tmp_path):
    raw = _write(tmp_path, _records())
    one = clean_file(raw, str(tmp_path / "one.jsonl"), CleanOptions(), num_workers=1, chunk_size=5)
    two = clean_file(raw, str(tmp_path / "two.jsonl"), CleanOptions(), num_workers=2, chunk_size=5)
    assert one.as_dict() == two.as_dict()
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
