"""The arena's guards: who is calling (a server-signed client id, an address from trusted proxies
only, the private arena's key), how often (token buckets per client and per address) and how many
battles each may hold, so that no client can reset its limits or push everyone else's battles out.

The `arena_client` cookie holds an id the server issued, signed with HMAC-SHA256 under a server
secret, so a browser can neither pick one (a fresh cookie per request resets nothing: the address
bucket still counts) nor take over another's battles. The address is the TCP peer;
`X-Forwarded-For` counts only from `serve.trusted_proxies`, which the server hands to uvicorn's
proxy-headers middleware.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response

from arenaflow.serve.errors import APIError
from arenaflow.serve.security import key_matches

log = logging.getLogger(__name__)

_SIGNED_ID = re.compile(r"([0-9a-f]{32})\.([A-Za-z0-9_-]{43})")


# -- who is calling -------------------------------------------------------------------------------
def address_key(host: str | None) -> str:
    """The rate-limit key of a client address: IPv4 as is, IPv6 by its /64 (one host usually
    holds a whole /64, so a key per address would give it billions of buckets)."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ClientIds:
    """Client ids the server issues, as `<id>.<HMAC-SHA256(secret, id)>` cookie values."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_env(cls, name: str | None) -> ClientIds:
        """The secret from `$<name>` (`serve.arena.client_secret_env`), else a random one per
        process."""
        if name is None:
            return cls(secrets.token_bytes(32))
        value = os.environ.get(name, "")
        if len(value) < 16:
            raise ValueError(
                f"serve.arena.client_secret_env names ${name}, which is "
                + ("not set" if not value else "shorter than 16 characters")
                + "; export a long random secret there (the same on every server behind one "
                "address) or set serve.arena.client_secret_env=null for a per-process secret"
            )
        return cls(value.encode("utf-8"))

    def _sign(self, client_id: str) -> str:
        digest = hmac.new(self._secret, client_id.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def issue(self) -> tuple[str, str]:
        """(a new client id, its cookie value)."""
        client_id = uuid.uuid4().hex
        return client_id, f"{client_id}.{self._sign(client_id)}"

    def verify(self, cookie: str | None) -> str | None:
        """The client id in a cookie this server signed; None for a missing, forged or foreign one."""
        match = _SIGNED_ID.fullmatch(cookie or "")
        if match is None:
            return None
        client_id, sig = match.groups()
        return client_id if hmac.compare_digest(sig, self._sign(client_id)) else None


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the signed client id, its address key, and the cookie to set when the
    id was issued just now (no valid cookie came with the request)."""

    client: str
    address: str
    new_cookie: str | None = None


def check_key(api_keys: list[str], request: Request) -> None:
    """The API's bearer-key check (`security.key_matches`, as /v1 uses) for a private arena;
    fails closed when no key is configured."""
    header = request.headers.get("authorization", "")
    if key_matches(header, api_keys):
        return
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "this arena is private (serve.arena.require_key): send the server's API key as "
            "'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    raise APIError(401, "incorrect API key provided", code="invalid_api_key")


# -- rate limit -----------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per client: `burst` calls at once, refilled at `per_minute`."""

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> float:
        """0.0 when the call may go ahead (one token taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)  # most recently used last
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)  # the least recently seen client starts afresh
        return wait

    def check(self, client: str, who: str = "this client", knobs: str = "") -> None:
        wait = self.take(client)
        if wait > 0:
            retry = max(1, int(wait + 0.999))
            knobs = knobs or f"{self.rate * 60:g} per minute, burst {self.burst:g}"
            raise APIError(
                429,
                f"too many arena requests from {who}; wait {retry} s and try again "
                f"(serve.arena.rate_limit: {knobs})",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )


# -- battles --------------------------------------------------------------------------------------
@dataclass
class Battle:
    id: str
    models: tuple[str, str]  # (model_a, model_b)
    anony: bool
    client_id: str
    address: str = ""  # address_key of the client that started it
    conversations: tuple[list[dict[str, str]], list[dict[str, str]]] = field(
        default_factory=lambda: ([], [])
    )
    turns: int = 0  # completed turns (both sides answered)
    streaming: bool = False
    voted: bool = False
    touched: float = field(default_factory=time.monotonic)


class Battles:
    """Battles in memory: at most `max_battles`, each forgotten `ttl_s` after its last use.

    A client holds at most `per_client` unfinished (unvoted) battles and an address at most
    `per_address`, so that no one can fill the table and push everyone else's battles out: only
    a table full of many addresses' battles drops its oldest.
    """

    def __init__(
        self,
        max_battles: int,
        ttl_s: float,
        per_client: int | None = None,
        per_address: int | None = None,
    ) -> None:
        self.max_battles, self.ttl_s = max_battles, ttl_s
        self.per_client = per_client or max_battles
        self.per_address = per_address or max_battles
        self._items: OrderedDict[str, Battle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, battle_id: str) -> bool:
        return battle_id in self._items

    def add(self, battle: Battle) -> None:
        self._expire()
        open_ = [b for b in self._items.values() if not b.voted]
        for limit, knob, who, mine in (
            (
                self.per_client,
                "max_battles_per_client",
                "this browser has",
                [b for b in open_ if b.client_id == battle.client_id],
            ),
            (
                self.per_address,
                "max_battles_per_address",
                "your network address has",
                [b for b in open_ if b.address == battle.address],
            ),
        ):
            if len(mine) >= limit:
                first_free = min(b.touched for b in mine) + self.ttl_s - time.monotonic()
                retry = max(1, math.ceil(first_free))
                raise APIError(
                    429,
                    f"{who} {len(mine)} unfinished arena battles, the most allowed "
                    f"(serve.arena.{knob}); vote on one of them, or start a new one in "
                    f"{retry} s when the oldest expires (serve.arena.battle_ttl_s)",
                    code="too_many_battles",
                    headers={"Retry-After": str(retry)},
                )
        while len(self._items) >= self.max_battles:
            old_id, _ = self._items.popitem(last=False)
            log.info("arena battle %s dropped to make room (serve.arena.max_battles)", old_id)
        self._items[battle.id] = battle

    def get(self, battle_id: str) -> Battle:
        self._expire()
        battle = self._items.get(battle_id)
        if battle is None:
            raise APIError(
                404,
                f"no arena battle {battle_id!r} on this server (unknown, or expired after "
                "serve.arena.battle_ttl_s); start a new round",
                param="battle_id",
                code="battle_not_found",
            )
        battle.touched = time.monotonic()
        self._items.move_to_end(battle_id)
        return battle

    def _expire(self) -> None:
        limit = time.monotonic() - self.ttl_s
        while self._items:
            first = next(iter(self._items.values()))
            if first.touched >= limit:
                return
            self._items.popitem(last=False)


COOKIE = "arena_client"


class Guards:
    """Every guard of one arena server: who calls (signed ids, addresses), the private arena's
    keys, the two token buckets and the battle table's bounds."""

    def __init__(self, settings: Any, api_keys: list[str]) -> None:
        s = self.settings = settings
        self.api_keys = api_keys
        self.ids = ClientIds.from_env(s.client_secret_env)
        self.limiter = RateLimiter(s.per_minute, s.burst, s.max_clients)
        self.address_limiter = RateLimiter(s.address_per_minute, s.address_burst, s.max_clients)
        self.battles = Battles(
            s.max_battles, s.battle_ttl_s, s.max_battles_per_client, s.max_battles_per_address
        )

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
            check_key(self.api_keys, request)
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
