"""Read a judge's verdict out of its reply: MT-bench's `[[rating]]`, `[[A]]`/`[[B]]`/`[[C]]` and
`[[a, b]]` formats (FastChat's regexes and backups), a structured JSON verdict
(`{"score": 1..10}`, `{"winner": "A" | "B" | "tie"}`, validated against its schema), and, when the
text holds none, from the probability the judge gave each verdict token after a forced verdict
prefix. Where the reply came with its own per-token logprobs, the verdict token's alternatives
give the verdict probabilities and the expected rating beside the argmax verdict. A reply without
a verdict says why (`Verdict.error`), so parse failures are counted by reason.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TIE_DELTA = 0.1  # [[a, b]] scores closer than this are a tie (FastChat)

ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
TWO_SCORE = re.compile(r"\[\[(\d+\.?\d*),\s?(\d+\.?\d*)\]\]")
TWO_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*),\s?(\d+\.?\d*)\]")

RATING_TOKENS = [str(i) for i in range(1, 11)]
PAIR_TOKENS = ["A", "B", "C"]
PAIR_TOKEN_WINNER = {"A": "A", "B": "B", "C": "tie"}


@dataclass
class Verdict:
    """A parsed verdict: `score` (single) or `winner` ("A" | "B" | "tie"); both None when unparsed."""

    score: float | None = None
    winner: str | None = None
    source: str = "none"  # "text" | "logprobs" | "none"
    expected_score: float | None = None  # probability-weighted rating (logprob recovery)
    probs: dict[str, float] | None = None
    error: str | None = None  # why the text held no verdict (kept when logprobs recover one)

    @property
    def parsed(self) -> bool:
        return self.score is not None or self.winner is not None


def parse_rating(judgment: str) -> float | None:
    """`[[7]]`, else the backup `[7]`; None when neither is there (FastChat's -1)."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return float(ast.literal_eval(match.group(1))) if match else None


def parse_pair(judgment: str, output_format: str = "[[A]]") -> str | None:
    """The winner of a pairwise judgment: "A", "B", "tie", or None when unparsed.

    `[[A]]` format: the first of [[A]], [[B]], [[C]] checked in that order (FastChat);
    `[[rating_a,rating_b]]` format: the higher score wins, within TIE_DELTA a tie.
    """
    if output_format == "[[rating_a,rating_b]]":
        match = TWO_SCORE.search(judgment) or TWO_SCORE_BACKUP.search(judgment)
        if not match:
            return None
        a, b = (float(ast.literal_eval(s.strip())) for s in match.groups())
        if abs(a - b) <= TIE_DELTA:
            return "tie"
        return "A" if a > b else "B"
    for token in PAIR_TOKENS:
        if f"[[{token}]]" in judgment:
            return PAIR_TOKEN_WINNER[token]
    return None


class ScoreVerdict(BaseModel):
    """A structured single grading: the rating alone."""

    model_config = ConfigDict(extra="forbid")
    score: int = Field(ge=1, le=10)


class WinnerVerdict(BaseModel):
    """A structured pairwise verdict: A, B or a tie."""

    model_config = ConfigDict(extra="forbid")
    winner: Literal["A", "B", "tie"]


def verdict_model(output_format: str) -> type[ScoreVerdict] | type[WinnerVerdict]:
    """The structured verdict that stands for a FastChat output format."""
    return ScoreVerdict if output_format == "[[rating]]" else WinnerVerdict


# where the verdict token of a JSON verdict starts
JSON_VALUE = {
    ScoreVerdict: re.compile(r'"score"\s*:\s*(\d)'),
    WinnerVerdict: re.compile(r'"winner"\s*:\s*"(A|B|tie)"'),
}


def verdict_schema(output_format: str) -> dict:
    """The JSON schema a structured judge answers with (OpenAI strict mode accepts it)."""
    return verdict_model(output_format).model_json_schema()


def parse_json_verdict(judgment: str, output_format: str) -> Verdict:
    """A structured verdict, validated against its schema; an object that does not validate is
    a parse failure whose `error` names the field and the rule (`score: Input should be ...`)."""
    text = judgment.strip()
    start, end = text.find("{"), text.rfind("}")
    if (start, end) != (0, len(text) - 1) and -1 < start < end:
        text = text[start : end + 1]  # prose or a code fence around the object
    try:
        parsed = verdict_model(output_format).model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return Verdict(error="not JSON")
        where = ".".join(str(part) for part in first["loc"])
        return Verdict(error=f"{where}: {first['msg']}" if where else first["msg"])
    if isinstance(parsed, ScoreVerdict):
        return Verdict(score=float(parsed.score), source="text")
    return Verdict(winner=parsed.winner, source="text")


def parse_verdict(judgment: str, output_format: str, structured: bool = False) -> Verdict:
    """Parse a reply by the prompt's `output_format` ("[[rating]]", "[[A]]", "[[rating_a,rating_b]]"),
    or as that format's JSON verdict when the judge was asked for one (`structured`)."""
    if structured:
        return parse_json_verdict(judgment, output_format)
    if output_format == "[[rating]]":
        score = parse_rating(judgment)
        if score is None:
            return Verdict(error="no [[rating]] in the reply")
        return Verdict(score=score, source="text")
    winner = parse_pair(judgment, output_format)
    if winner is None:
        return Verdict(error=f"no {output_format} verdict in the reply")
    return Verdict(winner=winner, source="text")


def _verdict_key(token: str, structured: bool) -> str:
    """A candidate token as a verdict token: a JSON verdict's `"A"` / `"tie"` (or the `t` / `ti`
    that begins it) read as A / C, quotes and braces around it ignored."""
    key = token.strip()
    if structured:
        key = key.strip('"{}')
        key = "C" if key and "tie".startswith(key) else key
    return key


def verdict_from_logprobs(
    top: Mapping[str, float], output_format: str, structured: bool = False
) -> Verdict:
    """Recover a verdict from the top logprobs of the token after a forced `[[` prefix (or of the
    verdict token of a JSON verdict, `structured`).

    `top` maps candidate token text to logprob. Single grading: the most probable rating is
    the score and the probability-weighted mean rating is kept as `expected_score`; a `1` token
    may be the start of `10`, so it is read as 1. Pairwise: the most probable of A / B / C.
    """
    wanted = RATING_TOKENS if output_format == "[[rating]]" else PAIR_TOKENS
    probs: dict[str, float] = {}
    for token, logprob in top.items():
        key = _verdict_key(token, structured)
        if key in wanted:
            probs[key] = probs.get(key, 0.0) + math.exp(logprob)
    if not probs:
        return Verdict(source="none")
    total = sum(probs.values())
    norm = {k: v / total for k, v in sorted(probs.items())}
    best = max(norm, key=norm.get)
    if output_format == "[[rating]]":
        expected = sum(float(k) * p for k, p in norm.items())
        return Verdict(score=float(best), source="logprobs", expected_score=expected, probs=norm)
    return Verdict(winner=PAIR_TOKEN_WINNER[best], source="logprobs", probs=norm)


# One generated token and its alternatives (token text -> logprob), as a backend returns them.
TokenTop = tuple[str, Mapping[str, float]]


def verdict_offset(judgment: str, output_format: str, structured: bool = False) -> int | None:
    """Where the verdict token of the parsed verdict starts (just after its `[[`, or the value of
    its JSON field), or None."""
    if structured:
        match = JSON_VALUE[verdict_model(output_format)].search(judgment)
        return match.start(1) if match else None
    if output_format == "[[rating]]":
        match = ONE_SCORE.search(judgment)
        return match.start(1) if match else None
    if output_format == "[[A]]":
        for token in PAIR_TOKENS:  # the token parse_pair picks, in its order
            i = judgment.find(f"[[{token}]]")
            if i != -1:
                return i + 2
    return None


def with_token_probabilities(
    verdict: Verdict,
    tokens: Sequence[TokenTop] | None,
    output_format: str,
    structured: bool = False,
) -> Verdict:
    """Add the verdict probabilities (and the expected rating) read at the verdict token of the
    reply's own logprobs; the argmax verdict from the text stays the verdict."""
    if not verdict.parsed or not tokens:
        return verdict
    text = "".join(tok for tok, _ in tokens)
    spelled = parse_verdict(text, output_format, structured)
    at = verdict_offset(text, output_format, structured)
    if at is None or (spelled.score, spelled.winner) != (verdict.score, verdict.winner):
        return verdict  # the tokens do not spell the verdict that was parsed
    offset = 0
    for tok, top in tokens:
        if offset == at:
            read = verdict_from_logprobs(top, output_format, structured)
            if read.parsed:
                verdict.expected_score, verdict.probs = read.expected_score, read.probs
            break
        if offset > at:
            break  # the verdict token was merged into a longer one: no reading
        offset += len(tok)
    return verdict
