"""The arena's settings: `serve.arena` (conf/serve/default.yaml holds every default) plus the
data config's blocked words, checked once when the server starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arenaflow.engine import SamplingParams
from arenaflow.serve.security import trusted_proxies

_AT_LEAST_ONE = (
    "max_prompt_chars",
    "max_turns",
    "max_tokens",
    "burst",
    "address_burst",
    "max_battles",
    "max_battles_per_client",
    "max_battles_per_address",
)


@dataclass(frozen=True)
class ArenaSettings:
    """`serve.arena` plus the data config's blocked words."""

    enabled: bool
    max_prompt_chars: int
    max_turns: int
    max_tokens: int
    temperature: float
    top_p: float
    per_minute: float
    burst: int
    address_per_minute: float
    address_burst: int
    max_clients: int
    max_battles: int
    max_battles_per_client: int
    max_battles_per_address: int
    battle_ttl_s: float
    trusted_proxies: tuple[str, ...]
    client_secret_env: str | None
    require_key: bool
    blocked_words: tuple[str, ...]

    @classmethod
    def from_cfg(cls, cfg: Any) -> ArenaSettings:
        arena, rate = cfg.serve.arena, cfg.serve.arena.rate_limit
        out = cls(
            enabled=bool(arena.enabled),
            max_prompt_chars=int(arena.max_prompt_chars),
            max_turns=int(arena.max_turns),
            max_tokens=int(arena.max_tokens),
            temperature=float(arena.temperature),
            top_p=float(arena.top_p),
            per_minute=float(rate.per_minute),
            burst=int(rate.burst),
            address_per_minute=float(rate.address_per_minute),
            address_burst=int(rate.address_burst),
            max_clients=int(rate.max_clients),
            max_battles=int(arena.max_battles),
            max_battles_per_client=int(arena.max_battles_per_client),
            max_battles_per_address=int(arena.max_battles_per_address),
            battle_ttl_s=float(arena.battle_ttl_s),
            trusted_proxies=trusted_proxies(cfg),
            client_secret_env=arena.client_secret_env or None,
            require_key=bool(arena.require_key),
            blocked_words=tuple(cfg.data.blocked_words or ()) if "data" in cfg else (),
        )
        for name in _AT_LEAST_ONE:
            if getattr(out, name) < 1:
                raise ValueError(f"serve.arena.{name} must be >= 1, got {getattr(out, name)}")
        for name in ("per_minute", "address_per_minute"):
            if getattr(out, name) <= 0:
                raise ValueError(
                    f"serve.arena.rate_limit.{name} must be > 0, got {getattr(out, name)}"
                )
        SamplingParams(temperature=out.temperature, top_p=out.top_p).validate()
        return out
