"""The battles step: one battle file from every source of votes, the judge's pairwise judgments
(swap rule), `rating.external_battles` and the arena's human votes, with each source's count of
rows that could not be a battle and why.

`build_battles(cfg, judgments)` resolves every path and switch from the config once; the readers
below it take plain values.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.rating import battles as bt_io
from arenaflow.tracking import tracker_from_cfg

log = logging.getLogger(__name__)


def metric_name(name: str) -> str:
    """An MLflow-safe metric name (model names may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]+", "_", name).strip("_ ")


def calibration_summary(calibration: dict[str, Any] | None) -> dict[str, Any]:
    """What the rating needs of the judge's calibration: passed, the one-line summary, figures."""
    if not calibration:
        return {"passed": False, "summary": "the judge was not calibrated", "figures": {}}
    return {k: calibration.get(k) for k in ("passed", "summary", "figures")}


def read_human_votes(
    db_url: str | None, named_votes: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The arena's votes (FastChat battle dicts) at `db_url` and where they came from; none when
    `db_url` is None (`rating.human_votes` off) or the SQLite file does not exist yet (no vote was
    cast). Named-mode votes (`anony` false) count only with `named_votes`
    (`rating.arena_named_votes`)."""
    from arenaflow.arena import VoteStore, database_exists, safe_url

    info: dict[str, Any] = {"enabled": db_url is not None, "db": None, "votes": 0}
    if db_url is None:
        info["note"] = "rating.human_votes=false"
        return [], info
    info["db"] = safe_url(db_url)
    if not database_exists(db_url):
        info["note"] = f"no vote database at {info['db']} yet: zero human votes"
        return [], info
    store = VoteStore(db_url)
    try:
        votes = store.battles()
    except Exception as e:
        raise RuntimeError(
            f"could not read the arena votes at {info['db']} ({e}); fix serve.arena.db_url "
            "or set rating.human_votes=false"
        ) from e
    finally:
        store.dispose()
    named = [v for v in votes if not v.get("anony", True)]
    info["named_votes"] = len(named)
    info["named_votes_used"] = bool(named_votes)
    left_out = bool(named) and not named_votes
    if left_out:
        votes = [v for v in votes if v.get("anony", True)]
        log.info(
            "%d named-mode arena vote(s) left out of the ratings (rating.arena_named_votes=false)",
            len(named),
        )
    info["votes"] = len(votes)
    info["note"] = f"{len(votes)} vote(s) from {info['db']}" + (
        f" ({len(named)} named-mode vote(s) left out: rating.arena_named_votes=false)"
        if left_out
        else ""
    )
    return votes, info


def judged_answer_styles(judgments: list[Any], answer_uri: Callable[[str], str]) -> bt_io.Styles:
    """The style counts of every judged model's MT-bench answers (where its answer file exists)."""
    models = {
        str(r[k])
        for r in judgments
        if isinstance(r, dict)
        for k in ("model_1", "model_2")
        if r.get(k)
    }
    styles: bt_io.Styles = {}
    for model in sorted(models):
        uri = answer_uri(model)
        if io.exists(uri):
            styles.update(bt_io.answer_styles(io.read_jsonl(uri), model))
    return styles


class _Origins:
    """Battle rows gathered origin by origin, with each origin's valid count and invalid reasons."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.valid: dict[str, int] = {}
        self.invalid: dict[str, dict[str, int]] = {}

    def add(self, origin: str, battles: Iterable[dict[str, Any]], counts: Counter[str]) -> None:
        self.rows.extend(battles)  # drains the reader, which fills `counts`
        self.valid[origin] = counts.pop("valid", 0)
        self.invalid[origin] = dict(counts)


def _require(uri: str, message: str) -> None:
    if not io.exists(uri):
        raise FileNotFoundError(message)


def gather_battles(
    pair_uri: str | None,
    external: Iterable[str],
    votes: list[dict[str, Any]] | None,
    answer_uri: Callable[[str], str],
) -> _Origins:
    """Battles from the pairwise judgments, the external files and the arena votes (None: off)."""
    found = _Origins()
    if pair_uri:
        _require(
            pair_uri,
            f"pairwise judgments not found at {pair_uri}; materialize mt_bench_judgments "
            "with judge.mode including pairwise (python -m arenaflow.judge)",
        )
        counts: Counter[str] = Counter()
        records = list(bt_io.read_records(pair_uri, counts))
        styles = judged_answer_styles(records, answer_uri)
        found.add("mt_bench", bt_io.battles_from_pairwise(records, counts, styles), counts)
    for uri in external:
        _require(
            uri,
            f"external battle file {uri} (rating.external_battles) does not exist; "
            "fix the URI or remove it from rating.external_battles",
        )
        counts = Counter()
        found.add(
            uri, bt_io.battles_from_records(bt_io.read_records(uri, counts), uri, counts), counts
        )
    if votes is not None:
        counts = Counter()
        found.add(
            "arena", bt_io.battles_from_records(votes, "arena", counts, source="human"), counts
        )
    for origin, reasons in found.invalid.items():
        for reason, n in reasons.items():
            log.warning("%s: %d row(s) not used as battles: %s", origin, n, reason)
    return found


def other_models(rows: list[dict[str, Any]], competitors: set[str]) -> tuple[Counter[str], int]:
    """Human battles may name models this run did not evaluate (older champions, other servers):
    they stay in the fit; this counts them, and the battles that hold one."""
    outside: Counter[str] = Counter()
    with_outside = 0
    for r in rows:
        if r["source"] == "human":
            names = [m for m in (r["model_a"], r["model_b"]) if m not in competitors]
            outside.update(names)
            with_outside += bool(names)
    return outside, with_outside


def build_battles(cfg: DictConfig, judgments: dict[str, Any] | None) -> dict[str, Any]:
    """Battles from the pairwise judgments (swap rule), `rating.external_battles` and the arena's
    human votes (`rating.human_votes`), one file; each row's `source` says judge or human.

    Rows that cannot be a battle are counted per origin and reason; the stage fails only when
    nothing usable is left, naming what to fix.
    """
    from arenaflow.arena import vote_db_url
    from arenaflow.evaluate.answers import answer_uri

    r = cfg.rating
    judgments = judgments or {}
    pair_uri = judgments.get("pair_uri")
    db_url = vote_db_url(cfg) if r.human_votes else None
    votes, human = read_human_votes(db_url, bool(r.get("arena_named_votes", False)))
    found = gather_battles(
        pair_uri,
        r.external_battles or [],
        votes if human["enabled"] else None,
        partial(answer_uri, cfg),
    )
    if not found.rows:
        raise ValueError(
            f"no valid battles (invalid rows by origin and reason: {found.invalid}; human votes: "
            f"{human['note']}); check the judge's pairwise output or rating.external_battles"
        )
    rows = bt_io.order_battles(found.rows)
    uri = io.artifact_uri(cfg, "rating", "battles.jsonl")
    io.write_jsonl(uri, rows)
    winners = dict(Counter(r["winner"] for r in rows))
    by_source = {s: sum(r["source"] == s for r in rows) for s in bt_io.SOURCES}
    outside, with_outside = other_models(rows, {str(c.name) for c in cfg.evaluate.competitors})
    human["battles"] = by_source["human"]
    human["battles_with_other_models"] = with_outside
    human["not_competitors"] = dict(sorted(outside.items()))
    result = {
        "uri": uri,
        "count": len(rows),
        "models": sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows}),
        "by_source": by_source,
        "by_origin": found.valid,
        "invalid": found.invalid,
        "winners": winners,
        "human_votes": human,
        "pair_uri": pair_uri,
        "judge_model": judgments.get("judge_model"),
        "judge_calibration": calibration_summary(judgments.get("calibration")),
    }
    with tracker_from_cfg(cfg).start_run("battles", cfg) as run:
        run.log_metrics(
            {
                "battles": len(rows),
                **{metric_name(f"battles.{k}"): v for k, v in winners.items()},
                **{f"battles_{k}": v for k, v in by_source.items()},
                "human_votes": human["votes"],
                "human_battles_with_other_models": with_outside,
            }
        )
        run.log_dict(result, "battles_summary.json")
        result["run_id"], result["run_url"] = run.run_id, run.url
    return result
