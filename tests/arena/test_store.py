"""The vote store on a real SQLite file: concurrent writers from threads and processes, duplicates."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from arenaflow.arena import VoteStore, default_db_url


def convs(prompt: str = "What is 2 + 2?") -> tuple[list[dict], list[dict]]:
    a = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "4"}]
    b = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "four"}]
    return a, b


def vote(store: VoteStore, battle_id: str, winner: str = "model_a", **kw) -> bool:
    a, b = convs()
    args = {
        "battle_id": battle_id,
        "model_a": "alpha",
        "model_b": "beta",
        "winner": winner,
        "anony": True,
        "conversation_a": a,
        "conversation_b": b,
        "client_id": "client-1",
        "language": "en",
    }
    args.update(kw)
    return store.record_vote(**args)


def _process_votes(url: str, prefix: str, n: int) -> list[bool]:
    store = VoteStore(url)
    winners = ["model_a", "model_b", "tie", "tie (bothbad)"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: vote(store, f"{prefix}-{i}", winners[i % 4]), range(n)))
    # every process also races on one shared battle: exactly one process may win it
    results.append(vote(store, "shared-battle"))
    store.dispose()
    return results


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'votes.db'}"


def test_record_and_read_back(db_url: str) -> None:
    store = VoteStore(db_url)
    a = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "No"},
    ]
    b = [*a[:3], {"role": "assistant", "content": "Knock knock"}]
    assert store.record_vote(
        battle_id="b2",
        model_a="alpha",
        model_b="beta",
        winner="model_b",
        anony=False,
        conversation_a=a,
        conversation_b=b,
        client_id="c9",
        tstamp=20.0,
    )
    assert vote(store, "b1", "tie (bothbad)", tstamp=10.0)
    assert store.count() == 2
    first, second = store.battles()
    assert (first["battle_id"], second["battle_id"]) == ("b1", "b2")  # sorted by tstamp
    assert second["winner"] == "model_b" and second["anony"] is False
    assert second["turn"] == 2 and second["language"] == "en"  # detected by langid
    assert second["conversation_a"] == a and second["conversation_b"] == b
    assert second["judge"] == "arena_user_c9" and second["tstamp"] == 20.0
    assert [x["battle_id"] for x in store.battles(since=10.0)] == ["b2"]
    # the file is a real SQLite database in WAL mode, in the folder the store created
    path = Path(store.url.database)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM arena_votes").fetchone()[0] == 2
    # a second store on the same file sees the votes (durable, tables not recreated)
    assert VoteStore(db_url).count() == 2


def test_duplicates_and_bad_votes(db_url: str) -> None:
    store = VoteStore(db_url)
    assert vote(store, "dup") is True
    assert vote(store, "dup", "model_b") is False
    assert store.count() == 1 and store.battles()[0]["winner"] == "model_a"
    with pytest.raises(ValueError, match="winner must be one of"):
        vote(store, "bad", "A is better")
    with pytest.raises(ValueError, match="two different models"):
        vote(store, "same", model_b="alpha")
    with pytest.raises(ValueError, match="conversation_a"):
        vote(store, "conv", conversation_a="hello")
    assert store.count() == 1


def test_200_concurrent_thread_votes_land_once(db_url: str) -> None:
    store = VoteStore(db_url)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: vote(store, f"t-{i}"), range(200)))
        # 50 threads race on the same battle: one vote lands
        dup = list(pool.map(lambda i: vote(store, "same-battle", "tie"), range(50)))
    assert all(results)
    assert sum(dup) == 1
    assert store.count() == 201
    ids = [b["battle_id"] for b in store.battles()]
    assert sorted(ids) == sorted([f"t-{i}" for i in range(200)] + ["same-battle"])


def test_200_concurrent_votes_from_processes_land_once(db_url: str) -> None:
    n_proc, per_proc = 4, 50
    ctx = mp.get_context("spawn")
    with ctx.Pool(n_proc) as pool:
        results = pool.starmap(_process_votes, [(db_url, f"p{p}", per_proc) for p in range(n_proc)])
    assert all(all(r[:per_proc]) for r in results)
    assert sum(r[per_proc] for r in results) == 1  # the shared battle was won by one process
    store = VoteStore(db_url)
    assert store.count() == n_proc * per_proc + 1
    battles = store.battles()
    assert len({b["battle_id"] for b in battles}) == len(battles)
    counts = {
        w: sum(b["winner"] == w for b in battles) for w in ("model_b", "tie", "tie (bothbad)")
    }
    assert counts == {"model_b": 52, "tie": 48, "tie (bothbad)": 48}


def test_from_cfg_default_and_override(make_cfg, af_home: Path, tmp_path: Path) -> None:
    store = VoteStore.from_cfg(make_cfg())
    assert str(store.url) == default_db_url(af_home) == f"sqlite:///{af_home}/arena/votes.db"
    assert (af_home / "arena").is_dir()
    other = tmp_path / "elsewhere" / "v.db"
    store = VoteStore.from_cfg(make_cfg(f"++serve.arena.db_url=sqlite:///{other}"))
    assert Path(store.url.database) == other and other.is_file()
