"""Evaluate fixtures: a stand-in OpenAI-compatible server (real uvicorn on loopback) and test configs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class FakeOpenAI:
    """What the stand-in server saw and how it misbehaves (to exercise retries and failures)."""

    url: str
    api_key: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_once: set[str] = field(default_factory=set)  # prompts answered with 500 the first time
    fail_always: set[str] = field(default_factory=set)  # prompts always answered with 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    port = _free_port()
    state = FakeOpenAI(url=f"http://127.0.0.1:{port}/v1", api_key="sk-test-secret")
    app = FastAPI()
    seen: set[str] = set()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        state.requests.append(body)
        last = body["messages"][-1]["content"]
        if last in state.fail_always:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        if last in state.fail_once and last not in seen:
            seen.add(last)
            return JSONResponse({"error": {"message": "flaky"}}, status_code=500)
        n_turn = sum(1 for m in body["messages"] if m["role"] == "user")
        text = (
            f"answer to turn {n_turn} ({len(body['messages'])} messages, t={body['temperature']})"
        )
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
            }
        )

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    yield state
    server.should_exit = True
    thread.join(timeout=10)
