"""The arena's in-memory guards on their own: the token bucket, the battle table, the settings."""

from __future__ import annotations

import time

import pytest

from arenaflow.arena.limits import (
    Battle,
    Battles,
    ClientIds,
    RateLimiter,
    address_key,
)
from arenaflow.arena.settings import ArenaSettings
from arenaflow.config import compose_config
from arenaflow.serve.errors import APIError
from arenaflow.serve.security import uvicorn_proxy_options


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


def battle(bid: str, client: str | None = None, address: str | None = None) -> Battle:
    """A battle of its own client and address unless told."""
    return Battle(
        id=bid, models=("x", "y"), anony=True, client_id=client or bid, address=address or bid
    )


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


def test_battles_are_bounded_per_client_and_per_address() -> None:
    battles = Battles(max_battles=100, ttl_s=3600, per_client=2, per_address=3)
    battles.add(battle("v1", client="victim", address="10.0.0.1"))
    battles.add(battle("x1", client="x", address="10.0.0.1"))
    battles.add(battle("x2", client="x", address="10.0.0.1"))
    with pytest.raises(APIError) as e:
        battles.add(battle("x3", client="x", address="10.0.0.9"))
    assert e.value.status == 429 and e.value.code == "too_many_battles"
    assert "max_battles_per_client" in e.value.message and e.value.headers["Retry-After"] == "3600"
    with pytest.raises(APIError) as e:  # a fresh client on the same address
        battles.add(battle("y1", client="y", address="10.0.0.1"))
    assert "network address" in e.value.message and "max_battles_per_address" in e.value.message
    battles.get("x1").voted = True  # a voted battle is finished: it no longer counts
    battles.add(battle("y1", client="y", address="10.0.0.1"))
    assert all(b in battles for b in ("v1", "x1", "x2", "y1"))  # nobody's battle was pushed out


def test_client_ids_are_signed_by_the_server(monkeypatch) -> None:
    ids = ClientIds(b"k" * 32)
    client, cookie = ids.issue()
    assert ids.verify(cookie) == client and cookie.startswith(client + ".")
    other_id, _ = ids.issue()
    assert ids.verify(f"{other_id}.{cookie.partition('.')[2]}") is None  # signature of another id
    assert ids.verify(ClientIds(b"z" * 32).issue()[1]) is None  # another server's secret
    for forged in (None, "", client, "a" * 32, cookie + "x", "é" * 76, cookie.upper()):
        assert ids.verify(forged) is None
    # a secret from the environment signs the same way in every process that shares it
    monkeypatch.setenv("ARENA_TEST_SECRET", "s" * 32)
    _, shared = ClientIds.from_env("ARENA_TEST_SECRET").issue()
    assert ClientIds.from_env("ARENA_TEST_SECRET").verify(shared) is not None
    monkeypatch.setenv("ARENA_TEST_SECRET", "short")
    with pytest.raises(ValueError, match=r"\$ARENA_TEST_SECRET.*shorter than 16"):
        ClientIds.from_env("ARENA_TEST_SECRET")


def test_address_keys_and_trusted_proxies(tmp_path) -> None:
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key(None) == "unknown"
    base = ["experiment=test", f"paths.home={tmp_path}"]
    assert uvicorn_proxy_options(compose_config(base)) == {
        "proxy_headers": False,
        "forwarded_allow_ips": [],
    }
    cfg = compose_config([*base, "serve.trusted_proxies=[10.0.0.5,'10.1.0.0/16']"])
    assert uvicorn_proxy_options(cfg) == {
        "proxy_headers": True,
        "forwarded_allow_ips": ["10.0.0.5", "10.1.0.0/16"],
    }
    bad = compose_config([*base, "serve.trusted_proxies=[my-proxy]"])
    with pytest.raises(ValueError, match=r"trusted_proxies: 'my-proxy' is not an IP"):
        uvicorn_proxy_options(bad)
