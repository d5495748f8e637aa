"""`Upstream`: the client of one engine process, in a slot where a `Scheduler` would be.

httpx (the `openai` client's own HTTP library, async and streaming) forwards request bodies as
they are; the gateway bounds how many are in flight (429 above), counts them for /metrics
(`stats()`, as a scheduler's) and maps the engine's error statuses to the gateway's own:
what the client caused keeps its status and the engine's message, the set-up's faults are 502s
naming the fix, an engine that cannot be reached is a 503, one that does not answer in time a 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from arenaflow.redact import redact
from arenaflow.serve.engine_process import EngineProcess
from arenaflow.serve.errors import APIError
from arenaflow.serve.loading import UpstreamSpec

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0  # a readiness probe of the engine (/ready asks every engine)
CONNECT_TIMEOUT_S = 5.0


class Upstream:
    """What a slot's scheduler is for a model an engine process serves: bounded in-flight requests
    forwarded with httpx (the `openai` client's own HTTP library, async and streaming; the engine
    process, not the gateway, queues and batches them)."""

    def __init__(
        self,
        name: str,
        spec: UpstreamSpec,
        api_key: str | None,
        *,
        timeout_s: float,
        max_in_flight: int,
        retry_after: str = "1",
        process: EngineProcess | None = None,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.name, self.spec, self.process = name, spec, process
        self.stop_timeout_s = stop_timeout_s
        self.retry_after = retry_after
        self.url = spec.url
        self.shown_url = redact(spec.url)  # a password in the URL never reaches a message
        self.max_in_flight = max_in_flight
        self.timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=f"{self.url}/", headers=headers)
        self.counts = {"completed": 0, "rejected": 0, "failed": 0, "cancelled": 0}
        self.running = 0

    def start(self) -> None:
        pass  # the engine process runs on its own; nothing to start in the app

    async def close(self) -> None:
        await self._client.aclose()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop, self.stop_timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "queue_depth": 0, **self.counts}

    # -- the engine's state ----------------------------------------------------------------------
    async def card(self) -> dict[str, Any] | None:
        """The engine's card for its model (None when unreachable or it does not list it)."""
        try:
            resp = await self._client.get("models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        data = resp.json().get("data") or []
        return next((c for c in data if c.get("id") == self.spec.model), None)

    async def problem(self) -> str | None:
        """Why the engine cannot serve now (for /ready), or None."""
        try:
            resp = await self._client.get("models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as e:
            return f"the engine process at {self.shown_url} is unreachable ({type(e).__name__})"
        if resp.status_code != 200:
            return f"the engine process at {self.shown_url} answers /models with {resp.status_code}"
        ids = [c.get("id") for c in resp.json().get("data") or []]
        if self.spec.model not in ids:
            return f"the engine process at {self.shown_url} does not serve {self.spec.model!r}"
        return None

    # -- requests --------------------------------------------------------------------------------
    def _admit(self) -> None:
        if self.running >= self.max_in_flight:
            self.counts["rejected"] += 1
            raise APIError(
                429,
                f"{self.max_in_flight} requests to {self.name} are in flight (serve.max_queue); "
                "retry later",
                code="queue_full",
                headers={"Retry-After": self.retry_after},
            )
        self.running += 1

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """One request to the engine: admitted, counted, its failures as the gateway's errors."""
        self._admit()
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # the client left
            self.counts["cancelled"] += 1
            raise
        except APIError as e:
            self.counts["rejected" if e.status == 429 else "failed"] += 1
            raise
        except httpx.HTTPError as e:
            self.counts["failed"] += 1
            raise self._mapped(e) from e
        except ValueError as e:  # a body or chunk that is not JSON
            self.counts["failed"] += 1
            message = f"the engine process of {self.name} sent what is not JSON ({e})"
            raise APIError(502, message, code="engine_error") from e
        else:
            self.counts["completed"] += 1
        finally:
            self.running -= 1

    async def submit(self, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The engine's answer to one request (its body), or the APIError it maps to."""
        async with self._call():
            resp = await self._client.post(endpoint, json=payload, timeout=self.timeout)
            if resp.status_code != 200:
                raise self.error(resp.status_code, resp.content, resp.headers)
            return resp.json()

    async def stream(self, endpoint: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The engine's stream chunks (parsed); the first `__anext__` raises an error status."""
        async with self._call():
            request = self._client.build_request(
                "POST", endpoint, json=payload, timeout=self.timeout
            )
            resp = await self._client.send(request, stream=True)
            try:
                if resp.status_code != 200:
                    raise self.error(resp.status_code, await resp.aread(), resp.headers)
                async for line in resp.aiter_lines():
                    data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                    if data and data != "[DONE]":
                        yield json.loads(data)
            finally:
                await resp.aclose()

    def _mapped(self, e: httpx.HTTPError) -> APIError:
        if isinstance(e, httpx.TimeoutException):
            message = f"the engine process of {self.name} did not answer in time"
            return APIError(504, f"{message} (serve.request_timeout_s)", code="timeout")
        return APIError(
            503,
            f"the engine process serving {self.name} at {self.shown_url} is unreachable "
            f"({type(e).__name__}); start it (or fix its url), then retry",
            code="engine_unavailable",
        )

    def error(self, status: int, content: bytes, headers: httpx.Headers) -> APIError:
        """An error status of the engine as the gateway's: what the client caused keeps its
        status and the engine's message; what the set-up causes is a 502 naming the fix."""
        message, param, code = _error_fields(content)
        engine = f"the engine process of {self.name} ({self.shown_url})"
        if status == 429:
            retry = {"Retry-After": headers["retry-after"]} if "retry-after" in headers else {}
            return APIError(429, message, param=param, code=code or "rate_limited", headers=retry)
        if status in (401, 403):
            return APIError(
                502,
                f"{engine} refused the gateway's key ({status}); set the variable its "
                "upstream.api_key_env names to the engine's key",
                code="engine_auth",
            )
        if status == 404:
            return APIError(502, f"{engine} answered 404: {message}", code="engine_not_found")
        if 400 <= status < 500:
            return APIError(400 if status == 422 else status, message, param=param, code=code)
        if status in (503, 504):
            return APIError(status, f"{engine}: {message}", code=code or "engine_unavailable")
        return APIError(502, f"{engine} failed ({status}): {message}", code="engine_error")


def _error_fields(content: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) of an OpenAI-style error body (vLLM's, ours) or a plain one."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500] or "no message", None, None
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        message = err.get("message") or err.get("detail") or json.dumps(err)[:500]
        code = err.get("code")
        return str(message), err.get("param"), None if code is None else str(code)
    return str(err)[:500], None, None
