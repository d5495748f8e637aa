"""The arena cannot be gamed, over real HTTP: server-issued client ids, per-address limits, trusted
proxies only, bounded battles per client, named votes kept out of the ratings, the page's CSP and
a private arena behind the API keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import httpx
import pytest

from arenaflow import io
from arenaflow.arena.limits import COOKIE
from arenaflow.config import compose_config
from arenaflow.rating.stage import build_battles
from tests.arena.test_arena_api import error_of, new_battle, play_turn

KEY = "arena-test-key-0123456789"
# Generous per-client limits, so that only the guard under test answers 429.
LOOSE = ("serve.arena.rate_limit.burst=1000", "serve.arena.rate_limit.per_minute=1")


def create(url: str, cookie: str | None = None, **headers: str) -> httpx.Response:
    """A new battle from a client without a cookie jar (a fresh client unless `cookie` is sent)."""
    if cookie is not None:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    return httpx.post(f"{url}/arena/api/battles", headers=headers, timeout=60)


def test_fresh_cookies_do_not_reset_the_address_limit(start_arena) -> None:
    overrides = (
        "serve.arena.rate_limit.address_burst=3",
        "serve.arena.rate_limit.address_per_minute=1",
    )
    with start_arena(*LOOSE, *overrides) as arena:
        made_up = [create(arena.url, cookie=f"made-up-client-{i}") for i in range(3)]
        assert [r.status_code for r in made_up] == [200] * 3
        r = create(arena.url, cookie="made-up-client-3")
        err = error_of(r, 429)
        assert err["code"] == "rate_limit_exceeded" and "your network address" in err["message"]
        assert "address_burst 3" in err["message"] and int(r.headers["Retry-After"]) >= 1
        error_of(create(arena.url), 429)  # no cookie at all: the same address bucket


def test_a_forged_or_foreign_cookie_is_a_new_client(start_arena) -> None:
    with start_arena() as arena, httpx.Client(base_url=arena.url, timeout=60) as owner:
        theirs = new_battle(owner)  # the server issued this browser its id
        issued = owner.cookies.get(COOKIE)
        owner_id, _, _ = issued.partition(".")
        sig = hmac.new(b"guessed secret", owner_id.encode(), hashlib.sha256).digest()
        signature = issued.partition(".")[2]
        tampered = signature[:-1] + ("B" if signature.endswith("A") else "A")
        forged = [
            owner_id,  # the id alone (what the old cookie was)
            f"{owner_id}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}",  # wrong secret
            f"{owner_id}.{tampered}",  # a tampered signature
        ]
        for cookie in forged:
            r = httpx.post(
                f"{arena.url}/arena/api/battles/{theirs}/turn",
                json={"prompt": "hi"},
                headers={"Cookie": f"{COOKIE}={cookie}"},
                timeout=60,
            )
            assert error_of(r, 403)["code"] == "not_your_battle", cookie
        # a made-up cookie is replaced by one the server signs; only that one owns the battle
        r = create(arena.url, cookie="my-own-chosen-id")
        assert r.status_code == 200, r.text
        new_cookie = r.cookies.get(COOKIE)
        assert new_cookie and new_cookie != "my-own-chosen-id" and "." in new_cookie
        turn = f"{arena.url}/arena/api/battles/{r.json()['battle_id']}/turn"
        for cookie, status in (("my-own-chosen-id", 403), (new_cookie, 200)):
            got = httpx.post(
                turn,
                json={"prompt": "hi"},
                headers={"Cookie": f"{COOKIE}={cookie}"},
                timeout=60,
            )
            assert got.status_code == status, got.text
        assert play_turn(owner, theirs)[-1] == {"done": True, "turn": 1}  # the owner still plays


@pytest.mark.parametrize("trusted", [False, True])
def test_x_forwarded_for_counts_only_from_a_trusted_proxy(start_arena, trusted: bool) -> None:
    overrides = [
        "serve.arena.rate_limit.address_burst=1",
        "serve.arena.rate_limit.address_per_minute=1",
    ]
    if trusted:
        overrides.append("serve.trusted_proxies=[127.0.0.1]")  # the test's own address
    with start_arena(*LOOSE, *overrides) as arena:
        assert create(arena.url, **{"X-Forwarded-For": "198.51.100.1"}).status_code == 200
        other = create(arena.url, **{"X-Forwarded-For": "198.51.100.2"})
        if trusted:  # the proxy's word: another person, another bucket
            assert other.status_code == 200, other.text
            same = create(arena.url, **{"X-Forwarded-For": "198.51.100.1"})
            assert error_of(same, 429)["code"] == "rate_limit_exceeded"
        else:  # anyone can write the header: the peer 127.0.0.1 is the client
            assert "your network address" in error_of(other, 429)["message"]


def test_a_battle_flood_gets_429_and_evicts_no_one(start_arena) -> None:
    overrides = (
        "serve.arena.max_battles=4",
        "serve.arena.max_battles_per_client=2",
        "serve.arena.max_battles_per_address=3",
        "serve.arena.rate_limit.address_burst=1000",
    )
    with (
        start_arena(*LOOSE, *overrides) as arena,
        httpx.Client(base_url=arena.url, timeout=60) as victim,
        httpx.Client(base_url=arena.url, timeout=60) as flooder,
    ):
        bid = new_battle(victim)
        play_turn(victim, bid)
        statuses = [flooder.post("/arena/api/battles").status_code for _ in range(6)]
        assert statuses == [200, 200] + [429] * 4
        err = error_of(flooder.post("/arena/api/battles"), 429)
        assert err["code"] == "too_many_battles" and "max_battles_per_client" in err["message"]
        err = error_of(create(arena.url), 429)  # dropping the cookie: the address is full
        assert err["code"] == "too_many_battles" and "max_battles_per_address" in err["message"]
        r = victim.post(f"/arena/api/battles/{bid}/vote", json={"winner": "leftvote"})
        assert r.status_code == 200, r.text  # the victim's battle survived the flood
        assert create(arena.url).status_code == 200  # a voted battle no longer counts


def test_named_votes_are_stored_but_rated_only_when_switched_on(start_arena, tmp_path) -> None:
    with start_arena() as arena, httpx.Client(base_url=arena.url, timeout=60) as client:
        for body in ({}, {"models": ["tiny-b", "tiny-a"]}):
            bid = new_battle(client, **body)
            play_turn(client, bid)
            r = client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "leftvote"})
            assert r.status_code == 200, r.text
        stored = arena.votes()
    assert sorted(v["anony"] for v in stored) == [False, True]  # both kept, with their mode
    base = [
        "experiment=test",
        f"paths.home={tmp_path / 'rating'}",
        "tracking=none",
        f"serve.arena.db_url={arena.db_url}",
    ]
    default = build_battles(compose_config(base), None)
    assert default["count"] == 1 and default["by_source"]["human"] == 1
    assert default["human_votes"]["named_votes"] == 1
    assert "named-mode vote(s) left out" in default["human_votes"]["note"]
    (anonymous,) = [v for v in stored if v["anony"]]
    rows = list(io.read_jsonl(default["uri"]))
    assert [r["question_id"] for r in rows] == [anonymous["battle_id"]]
    included = build_battles(compose_config([*base, "rating.arena_named_votes=true"]), None)
    assert included["count"] == 2 and included["human_votes"]["named_votes_used"] is True


def test_the_page_sends_a_content_security_policy(start_arena) -> None:
    with start_arena() as arena:
        r = httpx.get(f"{arena.url}/arena", timeout=60)
    assert r.status_code == 200
    csp = dict(
        part.strip().split(" ", 1) for part in r.headers["Content-Security-Policy"].split(";")
    )
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "unsafe" not in r.headers["Content-Security-Policy"]
    # every script the browser runs, and the style, is allowed by its hash; the config is data
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", r.text, re.S)
        assert len(bodies) == 1
        digest = base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()
        assert csp[directive] == f"'sha256-{digest}'"
    assert re.findall(r"<script\b[^>]*>", r.text) == [
        '<script type="application/json" id="arena-config">',
        "<script>",
    ]
    assert not re.search(r"\son[a-z]+=", r.text)  # no inline event handlers (CSP would block them)


def test_a_private_arena_wants_the_api_key(start_arena) -> None:
    keyless = ("serve.arena.require_key=true", "serve.api_keys=[]", "serve.api_keys_env=null")
    with pytest.raises(ValueError, match="require_key=true but the server has no API keys"):
        start_arena(*keyless).__enter__()
    with start_arena("serve.arena.require_key=true", f"serve.api_keys=[{KEY}]") as arena:
        page = httpx.get(f"{arena.url}/arena", params={"mode": "named"}, timeout=60)
        assert page.status_code == 200 and '"require_key": true' in page.text
        assert '"models": []' in page.text  # names only for a caller with the key
        url = f"{arena.url}/arena/api"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            assert error_of(httpx.post(f"{url}/battles", headers=headers), 401)["code"] == (
                "invalid_api_key"
            )
            assert httpx.get(f"{url}/models", headers=headers).status_code == 401
        odd = httpx.post(f"{url}/battles", headers=[(b"Authorization", b"Bearer \xe9\xff")])
        assert odd.status_code == 401  # bytes that are no key: 401, not 500
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=arena.url, timeout=60, headers=auth) as client:
            assert client.get("/arena/api/models").json() == {"models": ["tiny-a", "tiny-b"]}
            bid = new_battle(client)
            play_turn(client, bid)
            r = client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "tievote"})
            assert r.status_code == 200, r.text
            del client.headers["Authorization"]
            r = client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "tievote"})
            assert error_of(r, 401)["code"] == "invalid_api_key"
        assert len(arena.votes()) == 1
