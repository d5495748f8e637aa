"""Chatbot Arena on the serving app: `GET /arena` and the JSON/SSE API behind it.

A person chats with two served models side by side ("Model A" / "Model B", names hidden unless
they picked them in named mode), then votes; the vote goes to `arenaflow.arena.VoteStore` as one
FastChat battle row, which the rating stage reads as human battles. Battles live in memory
(bounded, expiring); votes are durable. Guards: a token bucket per client and one per network
address, a bound on each client's and address's unfinished battles, the prompt length, the data
config's blocked words, one vote per battle and only once both answers have finished.

Who a client is comes from the server: the `arena_client` cookie holds an id the server issued,
signed with HMAC-SHA256 under a server secret, so a browser can neither pick one (a fresh cookie
per request resets nothing: the address bucket still counts) nor take over another's battles. The
address is the TCP peer; `X-Forwarded-For` counts only from `serve.trusted_proxies`, which
the server hands to uvicorn's proxy-headers middleware. Those guards live in `arena_limits`. The
page sends a Content-Security-Policy that allows only its own (hashed) script and style, and
cannot be framed.
With `serve.arena.require_key` the API wants the server's bearer keys (a private arena).

`arena_router(state)` returns the routes; the app mounts it with `app.include_router`. The router's
lifespan opens the vote store after the models are loaded and disposes of it at shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field

from arenaflow.arena import VoteStore, safe_url, vote_db_url
from arenaflow.arena.limits import (
    Battle,
    Battles,
    Caller,
    ClientIds,
    RateLimiter,
    address_key,
    check_key,
)
from arenaflow.engine import (
    SamplingParams,
    Scheduler,
    StreamEvent,
)
from arenaflow.serve.errors import APIError, error_body
from arenaflow.serve.generation import map_engine_errors
from arenaflow.serve.security import trusted_proxies
from arenaflow.serve.streams import merge_streams, sse_event
from arenaflow.textfilters import contains_blocked_word

if TYPE_CHECKING:
    from arenaflow.serve.slots import ServeState

log = logging.getLogger(__name__)

COOKIE = "arena_client"
SIDES = ("a", "b")
# The page's buttons -> FastChat's battle winners.
VOTES = {
    "leftvote": "model_a",
    "rightvote": "model_b",
    "tievote": "tie",
    "bothbad_vote": "tie (bothbad)",
}
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
_STYLE = re.compile(r"<style>(.*?)</style>", re.S)


# -- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArenaSettings:
    """`serve.arena` plus the data config's blocked words."""

    enabled: bool = True
    max_prompt_chars: int = 2000
    max_turns: int = 8
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    per_minute: float = 20.0
    burst: int = 10
    address_per_minute: float = 120.0
    address_burst: int = 60
    max_clients: int = 10_000
    max_battles: int = 1000
    max_battles_per_client: int = 10
    max_battles_per_address: int = 50
    battle_ttl_s: float = 3600.0
    trusted_proxies: tuple[str, ...] = ()
    client_secret_env: str | None = None
    require_key: bool = False
    blocked_words: tuple[str, ...] = ()

    @classmethod
    def from_cfg(cls, cfg: Any) -> ArenaSettings:
        arena = cfg.serve.get("arena") or {}
        rate = arena.get("rate_limit") or {}
        words = tuple(cfg.data.blocked_words or ()) if "data" in cfg else ()
        out = cls(
            enabled=bool(arena.get("enabled", True)),
            max_prompt_chars=int(arena.get("max_prompt_chars", 2000)),
            max_turns=int(arena.get("max_turns", 8)),
            max_tokens=int(arena.get("max_tokens", 256)),
            temperature=float(arena.get("temperature", 0.7)),
            top_p=float(arena.get("top_p", 1.0)),
            per_minute=float(rate.get("per_minute", 20)),
            burst=int(rate.get("burst", 10)),
            address_per_minute=float(rate.get("address_per_minute", 120)),
            address_burst=int(rate.get("address_burst", 60)),
            max_clients=int(rate.get("max_clients", 10_000)),
            max_battles=int(arena.get("max_battles", 1000)),
            max_battles_per_client=int(arena.get("max_battles_per_client", 10)),
            max_battles_per_address=int(arena.get("max_battles_per_address", 50)),
            battle_ttl_s=float(arena.get("battle_ttl_s", 3600)),
            trusted_proxies=trusted_proxies(cfg),
            client_secret_env=arena.get("client_secret_env") or None,
            require_key=bool(arena.get("require_key", False)),
            blocked_words=tuple(words),
        )
        for name in (
            "max_prompt_chars",
            "max_turns",
            "max_tokens",
            "burst",
            "address_burst",
            "max_battles",
            "max_battles_per_client",
            "max_battles_per_address",
        ):
            if getattr(out, name) < 1:
                raise ValueError(f"serve.arena.{name} must be >= 1, got {getattr(out, name)}")
        for name in ("per_minute", "address_per_minute"):
            if getattr(out, name) <= 0:
                raise ValueError(
                    f"serve.arena.rate_limit.{name} must be > 0, got {getattr(out, name)}"
                )
        SamplingParams(temperature=out.temperature, top_p=out.top_p).validate()
        return out


# -- request bodies -------------------------------------------------------------------------------
class NewBattle(BaseModel):
    models: list[str] | None = Field(
        default=None, description="named mode: [model_a, model_b]; omitted = two random models"
    )


class Turn(BaseModel):
    prompt: str


class Vote(BaseModel):
    winner: Literal["leftvote", "rightvote", "tievote", "bothbad_vote"]


# -- the router -----------------------------------------------------------------------------------
class Arena:
    """The arena's state on one server: settings, battles, rate limits and the vote store."""

    def __init__(self, state: ServeState) -> None:
        self.state = state
        self.settings = ArenaSettings.from_cfg(state.cfg)
        s = self.settings
        if s.require_key and not state.api_keys:
            raise ValueError(
                "serve.arena.require_key=true but the server has no API keys; set serve.api_keys "
                "or serve.api_keys_env, or serve.arena.require_key=false for a public arena"
            )
        self.ids = ClientIds.from_env(s.client_secret_env)
        self.limiter = RateLimiter(s.per_minute, s.burst, s.max_clients)
        self.address_limiter = RateLimiter(s.address_per_minute, s.address_burst, s.max_clients)
        self.battles = Battles(
            s.max_battles, s.battle_ttl_s, s.max_battles_per_client, s.max_battles_per_address
        )
        self.store: VoteStore | None = None
        self.retry_after = str(max(1, math.ceil(float(state.cfg.serve.get("retry_after_s", 1)))))

    # -- helpers -------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(getattr(self.state, "models", None) or {})

    def require_models(self) -> list[str]:
        names = self.model_names()
        if len(names) < 2:
            raise APIError(
                503,
                f"the arena needs at least two served models and this server has {len(names)}; "
                "list them under serve.models",
                code="arena_unavailable",
            )
        return names

    def caller(self, request: Request) -> Caller:
        """Who sent the request; a request without a valid signed cookie is a new client."""
        address = address_key(request.client.host if request.client else None)
        client = self.ids.verify(request.cookies.get(COOKIE))
        if client is not None:
            return Caller(client, address)
        client, cookie = self.ids.issue()
        return Caller(client, address, new_cookie=cookie)

    def admit(self, request: Request) -> Caller:
        """The private arena's key, then the address's and the client's rate limits."""
        if self.settings.require_key:
            check_key(self.state.api_keys, request)
        caller = self.caller(request)
        s = self.settings
        self.address_limiter.check(
            caller.address,
            "your network address",
            f"address_per_minute {s.address_per_minute:g}, address_burst {s.address_burst}",
        )
        self.limiter.check(caller.client)
        return caller

    def set_cookie(self, response: Response, request: Request, caller: Caller) -> None:
        if caller.new_cookie is None:
            return
        response.set_cookie(
            COOKIE,
            caller.new_cookie,
            max_age=365 * 24 * 3600,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/arena",
        )

    def own_battle(self, battle_id: str, client: str) -> Battle:
        """The battle, if this client started it: only the person who chatted may go on or vote."""
        battle = self.battles.get(battle_id)
        if battle.client_id != client:
            raise APIError(
                403,
                "this battle belongs to another browser; start your own round on /arena",
                param="battle_id",
                code="not_your_battle",
            )
        return battle

    def check_prompt(self, prompt: str) -> str:
        text = prompt.strip()
        if not text:
            raise APIError(400, "the prompt is empty; type a question", param="prompt")
        limit = self.settings.max_prompt_chars
        if len(prompt) > limit:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} characters; the arena takes at most {limit} "
                "(serve.arena.max_prompt_chars)",
                param="prompt",
                code="prompt_too_long",
            )
        if contains_blocked_word(prompt, self.settings.blocked_words):
            raise APIError(
                400,
                "the prompt contains a word on the arena's blocked list (data.blocked_words); "
                "rephrase it",
                param="prompt",
                code="blocked_word",
            )
        return prompt

    def params_for(
        self, side: int, battle: Battle, messages: list[dict[str, str]]
    ) -> tuple[Scheduler, str, SamplingParams]:
        """(rendered prompt, sampling params) for one side; 400 when the chat outgrew the model."""
        slot = self.state.slot(battle.models[side])
        engine = slot.engine
        try:
            prompt = engine.render_chat(messages)
        except Exception as e:  # a template that rejects the messages
            raise APIError(
                400, f"the chat cannot be rendered for Model {SIDES[side].upper()}: {e}"
            ) from e
        room = engine.context_length - len(engine.encode(prompt))
        if room < 1:
            raise APIError(
                400,
                f"the conversation no longer fits Model {SIDES[side].upper()}'s context window "
                f"({engine.context_length} tokens); vote, then start a new round",
                param="prompt",
                code="context_length_exceeded",
            )
        params = SamplingParams(
            max_new_tokens=min(self.settings.max_tokens, room),
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
        )
        return slot.scheduler, prompt, params

    # -- endpoints -----------------------------------------------------------------------------
    def page(self, request: Request) -> HTMLResponse:
        names = self.model_names()
        named = request.query_params.get("mode") == "named"
        private = self.settings.require_key
        config = {
            "mode": "named" if named else "anony",
            # a private arena names its models only to a caller with a key (GET /arena/api/models)
            "models": names if named and not private else [],
            "require_key": private,
            "n_models": len(names),
            "max_prompt_chars": self.settings.max_prompt_chars,
            "max_turns": self.settings.max_turns,
            "unavailable": None
            if len(names) >= 2
            else f"The arena needs at least two served models; this server has {len(names)}. "
            "List them under serve.models and restart it.",
        }
        data = json.dumps(config).replace("<", "\\u003c")
        html, csp = _page()
        response = HTMLResponse(
            html.replace("/*ARENA_CONFIG*/null", data),
            headers={"Cache-Control": "no-store", **page_security_headers(csp)},
        )
        caller = self.caller(request)
        self.set_cookie(response, request, caller)
        return response

    def models(self, request: Request) -> dict[str, Any]:
        self.admit(request)
        return {"models": self.model_names()}

    def create(self, body: NewBattle, request: Request, response: Response) -> dict[str, Any]:
        caller = self.admit(request)
        names = self.require_models()
        if body.models is not None:
            if len(body.models) != 2:
                raise APIError(
                    400, f"models must name two models, got {len(body.models)}", param="models"
                )
            a, b = body.models
            for name in (a, b):
                if name not in names:
                    raise APIError(
                        404,
                        f"the model {name!r} is not served here; pick one of {names}",
                        param="models",
                        code="model_not_found",
                    )
            if a == b:
                raise APIError(400, "pick two different models", param="models")
            pair, anony = (a, b), False
        else:
            a, b = random.sample(names, 2)
            pair, anony = (a, b), True
        battle = Battle(
            id=uuid.uuid4().hex,
            models=pair,
            anony=anony,
            client_id=caller.client,
            address=caller.address,
        )
        self.battles.add(battle)
        self.set_cookie(response, request, caller)
        log.debug("arena battle %s (%s)", battle.id, "anonymous" if anony else "named")
        return {
            "battle_id": battle.id,
            "anony": anony,
            "models": None if anony else list(pair),
            "max_turns": self.settings.max_turns,
        }

    async def turn(self, battle_id: str, body: Turn, request: Request) -> StreamingResponse:
        caller = self.admit(request)
        self.require_models()
        battle = self.own_battle(battle_id, caller.client)
        if battle.voted:
            raise APIError(
                409, "this battle has been voted on; start a new round", code="battle_closed"
            )
        if battle.streaming:
            raise APIError(
                409,
                "the previous answers are still streaming; wait until both have finished",
                code="turn_in_progress",
            )
        if battle.turns >= self.settings.max_turns:
            raise APIError(
                400,
                f"a battle has at most {self.settings.max_turns} prompts "
                "(serve.arena.max_turns); vote, then start a new round",
                code="max_turns",
            )
        prompt = self.check_prompt(body.prompt)
        messages = [[*c, {"role": "user", "content": prompt}] for c in battle.conversations]
        sides = [self.params_for(i, battle, messages[i]) for i in range(2)]
        battle.streaming = True  # no await since the checks: a second turn sees it
        opened: list[tuple[AsyncIterator[StreamEvent], StreamEvent]] = []
        try:
            iters = [sched.stream(p, sp).__aiter__() for sched, p, sp in sides]
            firsts = await asyncio.gather(
                *(map_engine_errors(it.__anext__(), self.retry_after) for it in iters),
                return_exceptions=True,
            )
            for it, first in zip(iters, firsts, strict=True):
                if isinstance(first, BaseException):
                    for other in iters:
                        with contextlib.suppress(Exception):
                            await other.aclose()  # type: ignore[attr-defined]
                    raise first
                opened.append((it, first))
        except BaseException:
            battle.streaming = False
            raise
        return StreamingResponse(
            self._stream(battle, messages, opened),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(
        self,
        battle: Battle,
        messages: list[list[dict[str, str]]],
        opened: list[tuple[AsyncIterator[StreamEvent], StreamEvent]],
    ) -> AsyncIterator[str]:
        """Both answers as one SSE stream of `{"side", "text"}` / `{"side", "finish_reason"}`,
        then `{"done": true}`; the turn joins the battle only when both answers are complete."""
        texts = ["", ""]
        stream = merge_streams(opened)
        try:
            async for side, item in stream:
                if isinstance(item, Exception):
                    log.error("arena generation failed: %s", item)
                    yield sse_event(
                        error_body(503, f"generation failed: {item}; send the prompt again")
                    )
                    return
                if item.text:
                    texts[side] += item.text
                    yield sse_event({"side": SIDES[side], "text": item.text})
                if item.finish_reason:
                    yield sse_event({"side": SIDES[side], "finish_reason": item.finish_reason})
            for i in range(2):
                battle.conversations[i][:] = [
                    *messages[i],
                    {"role": "assistant", "content": texts[i]},
                ]
            battle.turns += 1
            yield sse_event({"done": True, "turn": battle.turns})
        finally:
            battle.streaming = False
            await stream.aclose()

    async def vote(self, battle_id: str, body: Vote, request: Request) -> dict[str, Any]:
        caller = self.admit(request)
        battle = self.own_battle(battle_id, caller.client)
        if battle.streaming or battle.turns == 0:
            raise APIError(
                409,
                "vote after both answers have finished"
                + (" (they are still streaming)" if battle.streaming else " (send a prompt first)"),
                code="answers_not_finished",
            )
        if battle.voted:
            raise APIError(409, "this battle already has a vote", code="already_voted")
        if self.store is None:
            raise APIError(503, "the vote store is not open yet; retry in a moment")
        battle.voted = True  # set before the first await: concurrent votes see it
        winner = VOTES[body.winner]
        try:
            stored = await asyncio.to_thread(
                self.store.record_vote,
                battle_id=battle.id,
                model_a=battle.models[0],
                model_b=battle.models[1],
                winner=winner,
                anony=battle.anony,
                conversation_a=list(battle.conversations[0]),
                conversation_b=list(battle.conversations[1]),
                client_id=caller.client,
            )
        except Exception as e:
            battle.voted = False
            log.exception("arena vote on battle %s could not be stored", battle.id)
            raise APIError(
                503, f"the vote could not be stored ({type(e).__name__}); try again"
            ) from e
        if not stored:
            raise APIError(409, "this battle already has a vote", code="already_voted")
        return {
            "battle_id": battle.id,
            "winner": winner,
            "model_a": battle.models[0],
            "model_b": battle.models[1],
            "anony": battle.anony,
        }


def arena_router(state: ServeState) -> APIRouter:
    """The arena's routes for an app whose `state.models` holds the served models."""
    arena = Arena(state)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        url = vote_db_url(state.cfg)
        arena.store = await asyncio.to_thread(VoteStore, url)
        log.info("arena at /arena: %d models, votes in %s", len(arena.model_names()), safe_url(url))
        try:
            yield
        finally:
            store, arena.store = arena.store, None
            await asyncio.to_thread(store.dispose)

    if not arena.settings.enabled:
        return APIRouter()
    router = APIRouter(lifespan=lifespan)

    @router.get("/arena", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        return arena.page(request)

    @router.get("/arena/api/models")
    async def models(request: Request) -> dict[str, Any]:
        return arena.models(request)

    @router.post("/arena/api/battles")
    async def create_battle(
        request: Request, response: Response, body: NewBattle | None = None
    ) -> dict[str, Any]:
        return arena.create(body or NewBattle(), request, response)

    @router.post("/arena/api/battles/{battle_id}/turn")
    async def turn(battle_id: str, body: Turn, request: Request) -> StreamingResponse:
        return await arena.turn(battle_id, body, request)

    @router.post("/arena/api/battles/{battle_id}/vote")
    async def vote(battle_id: str, body: Vote, request: Request) -> dict[str, Any]:
        return await arena.vote(battle_id, body, request)

    return router


def page_security_headers(csp: str) -> dict[str, str]:
    """The page may run only its own script and style, talk only to this server, and not be
    framed (clickjacking a vote); `X-Frame-Options` for browsers without `frame-ancestors`."""
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


@functools.cache
def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: its one inline script and style are allowed by
    their SHA-256 (the per-request config is a JSON data block, which browsers never run)."""
    html = resources.files("arenaflow.arena").joinpath("static/arena.html").read_text("utf-8")
    scripts, styles = _SCRIPT.findall(html), _STYLE.findall(html)
    if len(scripts) != 1 or len(styles) != 1:
        raise RuntimeError("arena.html must hold exactly one <script> and one <style> element")
    policy = {
        "default-src": "'none'",
        "script-src": _csp_hash(scripts[0]),
        "style-src": _csp_hash(styles[0]),
        "connect-src": "'self'",
        "img-src": "'self'",
        "form-action": "'self'",
        "base-uri": "'none'",
        "frame-ancestors": "'none'",
    }
    return html, "; ".join(f"{k} {v}" for k, v in policy.items())


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"
