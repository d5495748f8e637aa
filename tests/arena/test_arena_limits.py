"""The arena's in-memory guards on their own: the token bucket, the battle table, the settings."""

from __future__ import annotations

import time

import pytest

from arenaflow.config import compose_config
from arenaflow.serve.arena import ArenaSettings, Battle, Battles, RateLimiter
from arenaflow.serve.errors import APIError


def test_token_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    limiter = RateLimiter(per_minute=60, burst=2)
    assert limiter.take("c1", now=100.0) == 0.0
    assert limiter.take("c1", now=100.0) == 0.0
    assert limiter.take("c1", now=100.0) == pytest.approx(1.0)  # one token a second
    assert limiter.take("c1", now=100.5) == pytest.approx(0.5)  # a refused call takes nothing
    assert limiter.take("c1", now=101.0) == 0.0
    assert limiter.take("c2", now=101.0) == 0.0  # each client has its own bucket
    assert limiter.take("c1", now=1000.0) == 0.0  # a long pause refills to the burst, no more
    assert limiter.take("c1", now=1000.0) == 0.0
    assert limiter.take("c1", now=1000.0) > 0


def test_token_bucket_error_and_bounded_memory() -> None:
    limiter = RateLimiter(per_minute=30, burst=1, max_clients=3)
    limiter.check("c1")
    with pytest.raises(APIError) as e:
        limiter.check("c1")
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "2"}
    assert "30 per minute" in e.value.message
    for c in ("c2", "c3", "c4"):
        limiter.check(c)
    assert len(limiter._buckets) == 3 and "c1" not in limiter._buckets  # least recently seen


def battle(bid: str) -> Battle:
    return Battle(id=bid, models=("x", "y"), anony=True, client_id="c")


def test_battles_are_bounded_and_expire() -> None:
    battles = Battles(max_battles=2, ttl_s=3600)
    for bid in ("b1", "b2"):
        battles.add(battle(bid))
    battles.get("b1")  # used: b2 is now the oldest
    battles.add(battle("b3"))
    assert len(battles) == 2 and battles.get("b1").id == "b1"
    with pytest.raises(APIError) as e:
        battles.get("b2")
    assert e.value.status == 404 and "start a new round" in e.value.message

    short = Battles(max_battles=10, ttl_s=0.05)
    short.add(battle("old"))
    time.sleep(0.1)
    short.add(battle("new"))
    assert len(short) == 1
    with pytest.raises(APIError):
        short.get("old")


def test_settings_from_config_and_bad_values(tmp_path) -> None:
    cfg = compose_config(["experiment=test", f"paths.home={tmp_path}"])
    s = ArenaSettings.from_cfg(cfg)
    assert s.blocked_words == tuple(cfg.data.blocked_words) and s.max_prompt_chars == 2000
    assert (s.per_minute, s.burst) == (20.0, 10)
    bad = compose_config(["experiment=test", f"paths.home={tmp_path}", "serve.arena.max_turns=0"])
    with pytest.raises(ValueError, match=r"serve\.arena\.max_turns must be >= 1"):
        ArenaSettings.from_cfg(bad)
    hot = compose_config(["experiment=test", f"paths.home={tmp_path}", "serve.arena.temperature=5"])
    with pytest.raises(ValueError, match="temperature"):
        ArenaSettings.from_cfg(hot)
