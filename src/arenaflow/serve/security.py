"""Who may call the server: bearer API keys (`serve.api_keys` + `$serve.api_keys_env`) and the Host check.

Keys are compared in constant time as bytes, so any header a client sends (non-ASCII, no scheme,
empty) is a 401, never a 500. The `Host` header must be one of `allowed_hosts(serve)` (Starlette's
TrustedHostMiddleware does the check), so a web page on another domain that resolves to 127.0.0.1
(DNS rebinding) cannot reach a keyless local server. Client addresses come from the TCP peer;
`X-Forwarded-For` counts only from `serve.trusted_proxies` (`uvicorn_proxy_options`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Any

from fastapi import Request
from omegaconf import DictConfig

from arenaflow.serve.errors import APIError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def allowed_hosts(serve: DictConfig) -> list[str]:
    """`Host` values the server answers: serve.allowed_hosts (default the local names) + serve.host."""
    hosts = [str(h) for h in (serve.get("allowed_hosts") or LOCAL_HOSTS)]
    bind = str(serve.get("host") or "")
    if bind not in WILDCARD_BINDS and bind not in hosts:
        hosts.append(bind)
    return hosts


def api_keys_from_cfg(cfg: DictConfig) -> list[str]:
    """Keys from `serve.api_keys` plus the comma-separated `$<serve.api_keys_env>`."""
    keys = [str(k) for k in (cfg.serve.get("api_keys") or []) if str(k)]
    env_name = cfg.serve.get("api_keys_env")
    if env_name:
        keys += [k.strip() for k in os.environ.get(str(env_name), "").split(",") if k.strip()]
    return keys


def key_matches(header: str, keys: list[str]) -> bool:
    """Whether an `Authorization` header carries one of `keys` (constant-time, any bytes)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    # Starlette decodes headers as latin-1; compare bytes so non-ASCII input cannot raise
    sent = token.strip().encode("latin-1", errors="replace")
    return any(hmac.compare_digest(sent, k.encode("utf-8")) for k in keys)


class KeyCheck:
    """`has_key(request)` and the dependency `require(request)` (401) for a list of keys."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def has_key(self, request: Request) -> bool:
        """True when no keys are configured or the request carries one."""
        return not self.keys or key_matches(request.headers.get("authorization", ""), self.keys)

    async def require(self, request: Request) -> None:
        if self.has_key(request):
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' (serve.api_keys)",
                code="invalid_api_key",
            )
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")


def trusted_proxies(cfg: Any) -> tuple[str, ...]:
    """`serve.trusted_proxies`, each an IP address or CIDR network (checked: uvicorn would
    take a typo for a literal host name and trust nothing, silently)."""
    entries = tuple(str(p).strip() for p in (cfg.serve.get("trusted_proxies") or []))
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as e:
            raise ValueError(
                f"serve.trusted_proxies: {entry!r} is not an IP address or CIDR network "
                "(e.g. 10.0.0.5 or 10.0.0.0/8)"
            ) from e
    return entries


def uvicorn_proxy_options(cfg: Any) -> dict[str, Any]:
    """uvicorn's proxy-header options for this server: `X-Forwarded-For` / `-Proto` are honoured
    only when the TCP peer is one of `serve.trusted_proxies` (uvicorn's own default trusts
    127.0.0.1, so any local process could claim any address); none listed = never."""
    proxies = list(trusted_proxies(cfg))
    return {"proxy_headers": bool(proxies), "forwarded_allow_ips": proxies}
