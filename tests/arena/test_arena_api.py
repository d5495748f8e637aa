"""The arena API over real HTTP: battles, streamed turns, votes in SQLite, and every guard."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from arenaflow.arena import VoteStore
from tests.arena.conftest import MODEL_NAMES


def new_battle(client: httpx.Client, **body) -> str:
    r = client.post("/arena/api/battles", json=body)
    assert r.status_code == 200, r.text
    return r.json()["battle_id"]


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def play_turn(client: httpx.Client, battle_id: str, prompt: str = "Say hello.") -> list[dict]:
    r = client.post(f"/arena/api/battles/{battle_id}/turn", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse_events(r.text)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
def arena(start_arena):
    with start_arena() as srv:
        yield srv


@pytest.fixture
def client(arena) -> httpx.Client:
    with httpx.Client(base_url=arena.url, timeout=60) as c:
        yield c


def test_two_turn_battle_streams_both_sides_and_stores_one_vote(arena, client) -> None:
    page = client.get("/arena")
    assert page.status_code == 200 and "Chatbot Arena" in page.text
    cookie = client.cookies.get("arena_client")
    client_id, _, signature = cookie.partition(".")  # the server's id, signed by the server
    assert len(client_id) == 32 and len(signature) == 43

    created = client.post("/arena/api/battles").json()
    assert created["anony"] is True and created["models"] is None  # names stay hidden
    bid = created["battle_id"]
    first = play_turn(client, bid, "Name a colour.")
    assert {e["side"] for e in first if "finish_reason" in e} == {"a", "b"}
    assert first[-1] == {"done": True, "turn": 1}
    texts = {s: "".join(e.get("text", "") for e in first if e.get("side") == s) for s in "ab"}
    second = play_turn(client, bid, "And another one?")
    assert second[-1] == {"done": True, "turn": 2}

    r = client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "rightvote"})
    assert r.status_code == 200, r.text
    revealed = r.json()
    assert {revealed["model_a"], revealed["model_b"]} == set(MODEL_NAMES)
    assert revealed["winner"] == "model_b"

    (row,) = arena.votes()
    assert row["battle_id"] == bid and row["winner"] == "model_b" and row["anony"] is True
    assert (row["model_a"], row["model_b"]) == (revealed["model_a"], revealed["model_b"])
    assert row["client_id"] == client_id and row["turn"] == 2
    conv_a = row["conversation_a"]
    assert [m["role"] for m in conv_a] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in conv_a[::2]] == ["Name a colour.", "And another one?"]
    assert conv_a[1]["content"] == texts["a"]
    assert row["conversation_b"][1]["content"] == texts["b"]

    # the battle is closed: no more prompts, no second vote
    err = error_of(client.post(f"/arena/api/battles/{bid}/turn", json={"prompt": "more"}), 409)
    assert err["code"] == "battle_closed"
    err = error_of(client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "tievote"}), 409)
    assert err["code"] == "already_voted" and "already has a vote" in err["message"]
    assert len(arena.votes()) == 1


def test_named_battle_records_the_picked_models_not_anonymous(arena, client) -> None:
    err = error_of(client.post("/arena/api/battles", json={"models": ["tiny-a", "nope"]}), 404)
    assert err["code"] == "model_not_found" and "nope" in err["message"]
    err = error_of(client.post("/arena/api/battles", json={"models": ["tiny-a", "tiny-a"]}), 400)
    assert "two different models" in err["message"]
    created = client.post("/arena/api/battles", json={"models": ["tiny-b", "tiny-a"]}).json()
    assert created["anony"] is False and created["models"] == ["tiny-b", "tiny-a"]
    play_turn(client, created["battle_id"])
    r = client.post(
        f"/arena/api/battles/{created['battle_id']}/vote", json={"winner": "bothbad_vote"}
    )
    assert r.status_code == 200, r.text
    (row,) = arena.votes()
    assert (row["model_a"], row["model_b"], row["winner"]) == ("tiny-b", "tiny-a", "tie (bothbad)")
    assert row["anony"] is False
    page = client.get("/arena", params={"mode": "named"}).text
    assert '"mode": "named"' in page and '"models": ["tiny-a", "tiny-b"]' in page


def test_bad_prompts_are_refused_with_the_reason(arena, client) -> None:
    bid = new_battle(client)
    turn = f"/arena/api/battles/{bid}/turn"
    err = error_of(client.post(turn, json={"prompt": "x" * 2001}), 400)
    assert err["code"] == "prompt_too_long" and "2001 characters" in err["message"]
    assert "serve.arena.max_prompt_chars" in err["message"]
    err = error_of(client.post(turn, json={"prompt": "What does OpenAI sell?"}), 400)
    assert err["code"] == "blocked_word" and "blocked list" in err["message"]
    err = error_of(client.post(turn, json={"prompt": "   "}), 400)
    assert "empty" in err["message"]
    err = error_of(client.post(turn, json={"text": "hi"}), 400)
    assert err["param"] == "prompt"
    # none of the refused prompts entered the battle; a good one still works
    assert play_turn(client, bid, "x" * 2000)[-1]["turn"] == 1


def test_unknown_battle_and_bad_winner(arena, client) -> None:
    err = error_of(client.post("/arena/api/battles/nope/vote", json={"winner": "leftvote"}), 404)
    assert err["code"] == "battle_not_found" and "new round" in err["message"]
    err = error_of(client.post("/arena/api/battles/nope/turn", json={"prompt": "hi"}), 404)
    assert err["code"] == "battle_not_found"
    bid = new_battle(client)
    play_turn(client, bid)
    err = error_of(client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "model_a"}), 400)
    assert err["param"] == "winner" and "leftvote" in err["message"]
    assert arena.votes() == []


def test_vote_before_both_answers_finished_is_refused(start_arena) -> None:
    with (
        start_arena("serve.arena.max_tokens=160") as arena,
        httpx.Client(base_url=arena.url, timeout=60) as client,
    ):
        bid = new_battle(client)
        vote = f"/arena/api/battles/{bid}/vote"
        err = error_of(client.post(vote, json={"winner": "leftvote"}), 409)
        assert err["code"] == "answers_not_finished" and "send a prompt first" in err["message"]

        with client.stream(
            "POST", f"/arena/api/battles/{bid}/turn", json={"prompt": "Tell me a long story."}
        ) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["side"] in ("a", "b")
            err = error_of(client.post(vote, json={"winner": "leftvote"}), 409)
            assert err["code"] == "answers_not_finished" and "still streaming" in err["message"]
            err = error_of(
                client.post(f"/arena/api/battles/{bid}/turn", json={"prompt": "again"}), 409
            )
            assert err["code"] == "turn_in_progress"
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
        assert events[-1] == {"done": True, "turn": 1}
        for side in "ab":  # streamed token by token, not in one piece
            assert sum(1 for e in events if e.get("side") == side and e.get("text")) > 10
        assert client.post(vote, json={"winner": "leftvote"}).status_code == 200
        assert len(arena.votes()) == 1


def test_rate_limit_per_client_answers_429_with_retry_after(start_arena) -> None:
    with (
        start_arena("serve.arena.rate_limit.burst=2", "serve.arena.rate_limit.per_minute=60") as a,
        httpx.Client(base_url=a.url, timeout=60) as client,
    ):
        client.get("/arena")  # the page sets this browser's client cookie
        assert client.cookies.get("arena_client")
        new_battle(client)
        new_battle(client)
        r = client.post("/arena/api/battles")
        err = error_of(r, 429)
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
        assert "too many arena requests" in err["message"]
        assert r.headers["Retry-After"] == "1"
        # another client (its own cookie) has its own bucket, and its own battles
        with httpx.Client(base_url=a.url, timeout=60) as other:
            other.get("/arena")
            assert other.cookies.get("arena_client") != client.cookies.get("arena_client")
            theirs = new_battle(other)
        time.sleep(1.1)  # refills one call (per_minute=60)
        err = error_of(client.post(f"/arena/api/battles/{theirs}/turn", json={"prompt": "hi"}), 403)
        assert err["code"] == "not_your_battle"


def test_vote_already_in_the_database_from_another_process_is_refused(arena, client) -> None:
    bid = new_battle(client)
    play_turn(client, bid)
    store = VoteStore(arena.db_url)  # e.g. a second server process on the same database
    try:
        assert store.record_vote(
            battle_id=bid,
            model_a="tiny-a",
            model_b="tiny-b",
            winner="tie",
            anony=True,
            conversation_a=[],
            conversation_b=[],
            client_id="elsewhere",
        )
    finally:
        store.dispose()
    err = error_of(client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "leftvote"}), 409)
    assert err["code"] == "already_voted"
    (row,) = arena.votes()
    assert row["client_id"] == "elsewhere" and row["winner"] == "tie"


def test_fewer_than_two_models(start_arena) -> None:
    with start_arena(models=1) as arena, httpx.Client(base_url=arena.url, timeout=60) as c:
        page = c.get("/arena")
        assert page.status_code == 200
        assert "needs at least two served models; this server has 1" in page.text
        err = error_of(c.post("/arena/api/battles"), 503)
        assert err["code"] == "arena_unavailable" and "serve.models" in err["message"]


def test_arena_disabled_mounts_nothing(start_arena) -> None:
    with start_arena("serve.arena.enabled=false") as arena:
        assert httpx.get(f"{arena.url}/arena", timeout=30).status_code == 404
        assert httpx.get(f"{arena.url}/health", timeout=30).status_code == 200


async def _finished_battles(client: httpx.AsyncClient, n: int) -> list[str]:
    """`n` battles, each played through the real turn endpoint (a few in flight at once)."""
    ids = [(await client.post("/arena/api/battles")).json()["battle_id"] for _ in range(n)]
    gate = asyncio.Semaphore(32)

    async def play(bid: str) -> None:
        async with gate:
            r = await client.post(f"/arena/api/battles/{bid}/turn", json={"prompt": "Hi!"})
            assert r.status_code == 200, r.text
            assert sse_events(r.text)[-1] == {"done": True, "turn": 1}

    await asyncio.gather(*(play(b) for b in ids))
    return ids


def test_200_concurrent_votes_land_exactly_once(start_arena) -> None:
    winners = ["leftvote", "rightvote", "tievote", "bothbad_vote"]
    fastchat = {
        "leftvote": "model_a",
        "rightvote": "model_b",
        "tievote": "tie",
        "bothbad_vote": "tie (bothbad)",
    }

    async def scenario(url: str) -> tuple[list[str], list[int], list[int], str]:
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            ids = await _finished_battles(client, 201)
            dup, ids = ids[0], ids[1:]
            votes = await asyncio.gather(
                *(
                    client.post(f"/arena/api/battles/{b}/vote", json={"winner": winners[i % 4]})
                    for i, b in enumerate(ids)
                )
            )
            same = await asyncio.gather(
                *(
                    client.post(f"/arena/api/battles/{dup}/vote", json={"winner": winners[i % 4]})
                    for i in range(20)
                )
            )
        return ids, [r.status_code for r in votes], [r.status_code for r in same], dup

    overrides = (
        "serve.arena.rate_limit.burst=100000",
        "serve.arena.rate_limit.address_burst=100000",
        "serve.arena.max_battles_per_client=1000",
        "serve.arena.max_battles_per_address=1000",
        "serve.max_queue=512",
    )
    with start_arena(*overrides) as arena:
        ids, statuses, dup_statuses, dup = asyncio.run(scenario(arena.url))
        rows = arena.votes()
    assert statuses == [200] * 200
    assert sorted(dup_statuses) == [200] + [409] * 19
    by_id = {r["battle_id"]: r for r in rows}
    assert len(rows) == 201 and set(by_id) == {*ids, dup}
    for i, bid in enumerate(ids):
        row = by_id[bid]
        assert row["winner"] == fastchat[winners[i % 4]]
        assert row["anony"] is True and {row["model_a"], row["model_b"]} == set(MODEL_NAMES)
        assert row["conversation_a"][0] == {"role": "user", "content": "Hi!"}


def test_a_battle_takes_at_most_max_turns_prompts(start_arena) -> None:
    with (
        start_arena("serve.arena.max_turns=1") as arena,
        httpx.Client(base_url=arena.url, timeout=60) as client,
    ):
        bid = new_battle(client)
        play_turn(client, bid)
        r = client.post(f"/arena/api/battles/{bid}/turn", json={"prompt": "one more"})
        err = error_of(r, 400)
        assert err["code"] == "max_turns" and "serve.arena.max_turns" in err["message"]
        assert client.post(f"/arena/api/battles/{bid}/vote", json={"winner": "tievote"}).is_success
