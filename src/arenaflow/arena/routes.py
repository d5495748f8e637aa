"""Chatbot Arena on the serving app: `GET /arena` and the JSON/SSE API behind it.

A person chats with two served models side by side ("Model A" / "Model B", names hidden unless
they picked them in named mode), then votes; the vote goes to `arenaflow.arena.VoteStore` as one
FastChat battle row, which the rating stage reads as human battles. Battles live in memory
(bounded, expiring); votes are durable. Guards: a token bucket per client and one per network
address, a bound on each client's and address's unfinished battles, the prompt length, the data
config's blocked words, one vote per battle and only once both answers have finished.

Who a client is, the rate limits and the battle bounds are `limits.Guards`; the page and its
Content-Security-Policy are `page.py`; the settings `settings.py`.
With `serve.arena.require_key` the API wants the server's bearer keys (a private arena).

`arena_router(state)` returns the routes; the app mounts it with `app.include_router`. The router's
lifespan opens the vote store after the models are loaded and disposes of it at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field

from arenaflow.arena import VoteStore, safe_url, vote_db_url
from arenaflow.arena.limits import (
    Battle,
    Guards,
)
from arenaflow.arena.page import page_html, page_security_headers
from arenaflow.arena.settings import ArenaSettings
from arenaflow.arena.turns import SIDES, both_answers, open_both
from arenaflow.engine import (
    SamplingParams,
    Scheduler,
)
from arenaflow.serve.errors import APIError
from arenaflow.textfilters import contains_blocked_word

if TYPE_CHECKING:
    from arenaflow.serve.slots import ServeState

log = logging.getLogger(__name__)

# The page's buttons -> FastChat's battle winners.
VOTES = {
    "leftvote": "model_a",
    "rightvote": "model_b",
    "tievote": "tie",
    "bothbad_vote": "tie (bothbad)",
}


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
        self.guards = Guards(s, state.api_keys)
        self.battles = self.guards.battles
        self.store: VoteStore | None = None
        self.retry_after = str(max(1, math.ceil(float(state.cfg.serve.get("retry_after_s", 1)))))

    # -- helpers -------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """The models that battle: those served in process (an engine process's has no template
        here to render the arena's chat with)."""
        models = getattr(self.state, "models", None) or {}
        return [name for name, slot in models.items() if slot.engine is not None]

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
        html, csp = page_html()
        response = HTMLResponse(
            html.replace("/*ARENA_CONFIG*/null", data),
            headers={"Cache-Control": "no-store", **page_security_headers(csp)},
        )
        caller = self.guards.caller(request)
        self.guards.set_cookie(response, request, caller)
        return response

    def models(self, request: Request) -> dict[str, Any]:
        self.guards.admit(request)
        return {"models": self.model_names()}

    def create(self, body: NewBattle, request: Request, response: Response) -> dict[str, Any]:
        caller = self.guards.admit(request)
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
        self.guards.set_cookie(response, request, caller)
        log.debug("arena battle %s (%s)", battle.id, "anonymous" if anony else "named")
        return {
            "battle_id": battle.id,
            "anony": anony,
            "models": None if anony else list(pair),
            "max_turns": self.settings.max_turns,
        }

    async def turn(self, battle_id: str, body: Turn, request: Request) -> StreamingResponse:
        caller = self.guards.admit(request)
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
        try:
            opened = await open_both(sides, self.retry_after)
        except BaseException:
            battle.streaming = False
            raise
        return StreamingResponse(
            both_answers(battle, messages, opened),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def vote(self, battle_id: str, body: Vote, request: Request) -> dict[str, Any]:
        caller = self.guards.admit(request)
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
