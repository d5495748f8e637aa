"""ASGI middleware of the app: the request-body limit (413) and request metrics by endpoint and status."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from arenaflow.serve.errors import error_response
from arenaflow.serve.metrics import ServeMetrics

ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/ready",
    "/metrics",
)

Scope = dict[str, Any]
ASGIApp = Callable[..., Awaitable[None]]


class BodyLimitMiddleware:
    """413 for a request body above `max_bytes` (Content-Length or counted while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: what the server sends next (a disconnect)

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Any, send: Any) -> None:
        response = error_response(
            413,
            f"request body is larger than {self.max_bytes} bytes (serve.max_body_bytes); send less",
            code="request_too_large",
        )
        await response(scope, receive, send)


class RequestMetricsMiddleware:
    """Counts requests by endpoint and status and times them until their last body byte."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        t0 = time.perf_counter()
        status = {"code": 500}

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            if endpoint.startswith("/v1/"):
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
