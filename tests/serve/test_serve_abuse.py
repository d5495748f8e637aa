"""No request harms another, every input mistake is a 4xx, keys and Host hold (real uvicorn servers)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LIMITS = ("serve.max_messages=4", "serve.max_input_chars=400", "serve.max_batch_size=4")


def raw(srv, path: str, body: bytes | str, headers: dict | None = None) -> httpx.Response:
    data = body.encode() if isinstance(body, str) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{srv.url}{path}", content=data, headers=hdrs, timeout=60)


def chat(**change) -> str:
    return json.dumps({**CHAT, **change})


LONE = '"\\ud800 hi"'  # valid JSON, not valid Unicode: the tokenizer cannot take it
MALFORMED = [
    # (what, path, raw JSON body, status, param, code)
    (
        "lone surrogate in content",
        "/v1/chat/completions",
        chat().replace('"Hi"', LONE),
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (
        "lone surrogate in a content part",
        "/v1/chat/completions",
        chat().replace('"Hi"', '[{"type": "text", "text": ' + LONE + "}]"),
        400,
        None,
        "invalid_value",
    ),
    (
        "lone surrogate in a prompt",
        "/v1/completions",
        json.dumps({"model": "tiny-chat", "prompt": "x", "max_tokens": 2}).replace('"x"', LONE),
        400,
        "prompt",
        "invalid_value",
    ),
    (
        "lone surrogate in stop",
        "/v1/chat/completions",
        chat(stop="x").replace('"stop": "x"', '"stop": ' + LONE),
        400,
        "stop",
        "invalid_value",
    ),
    (
        "lone surrogate in model",
        "/v1/chat/completions",
        chat(model="x").replace('"model": "x"', '"model": ' + LONE),
        400,
        "model",
        "invalid_value",
    ),
    (
        "NaN temperature",
        "/v1/chat/completions",
        chat().replace('"max_tokens": 2', '"max_tokens": 2, "temperature": NaN'),
        400,
        "temperature",
        None,
    ),
    (
        "too many messages",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "a"}] * 5),
        400,
        "messages",
        "request_too_large",
    ),
    (
        "too many characters",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "a" * 401}]),
        400,
        "messages",
        "request_too_large",
    ),
    (
        "too many prompt characters",
        "/v1/completions",
        json.dumps({"model": "tiny-chat", "prompt": ["a" * 300, "b" * 300]}),
        400,
        "prompt",
        "request_too_large",
    ),
    (
        "prompts x n above a batch",
        "/v1/completions",
        json.dumps({"model": "tiny-chat", "prompt": ["a", "b", "c"], "n": 2}),
        400,
        "prompt",
        "request_too_large",
    ),
    ("n above a batch", "/v1/chat/completions", chat(n=5), 400, "n", "request_too_large"),
    ("five stop strings", "/v1/chat/completions", chat(stop=list("abcde")), 400, "stop", None),
    ("a long stop string", "/v1/chat/completions", chat(stop=["x" * 129]), 400, "stop", None),
    (
        "a tool without a name",
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {}}]),
        400,
        "tools[0].function.name",
        "invalid_value",
    ),
    (
        "tool_choice required without tools",
        "/v1/chat/completions",
        chat(tool_choice="required"),
        400,
        "tool_choice",
        "invalid_value",
    ),
    (
        "functions",
        "/v1/chat/completions",
        chat(functions=[{"name": "f"}]),
        400,
        "functions",
        "unsupported_parameter",
    ),
    (
        "response_format of an unknown type",
        "/v1/chat/completions",
        chat(response_format={"type": "json_objekt"}),
        400,
        "response_format.type",
        "invalid_value",
    ),
    (
        "logit_bias keyed by a word",
        "/v1/chat/completions",
        chat(logit_bias={"hello": 10}),
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "logit_bias above 100",
        "/v1/chat/completions",
        chat(logit_bias={"50": 101}),
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "logit_bias on a token id past the vocabulary",
        "/v1/completions",
        json.dumps({"model": "tiny-chat", "prompt": "a", "logit_bias": {"49152": 5}}),
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "presence_penalty above 2",
        "/v1/chat/completions",
        chat(presence_penalty=2.5),
        400,
        "presence_penalty",
        "invalid_value",
    ),
    (
        "repetition_penalty of 0",
        "/v1/completions",
        json.dumps({"model": "tiny-chat", "prompt": "a", "repetition_penalty": 0}),
        400,
        "repetition_penalty",
        "invalid_value",
    ),
    (
        "best_of",
        "/v1/completions",
        json.dumps({"model": "tiny-chat", "prompt": "a", "best_of": 3}),
        400,
        "best_of",
        "unsupported_parameter",
    ),
    ("not JSON", "/v1/chat/completions", "{", 400, None, None),
    ("a JSON array", "/v1/chat/completions", "[]", 400, None, None),
    (
        "content of wrong type",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        None,
        None,
    ),
    (
        "image part",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages",
        None,
    ),
]
ACCEPTED = [  # defaults and nulls of optional fields are fine; a tiny temperature is greedy
    chat(
        tools=None,
        tool_choice="none",
        response_format={"type": "text"},
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0.0,
        repetition_penalty=None,
        user="u-1",
        metadata={"a": "b"},
    ),
    chat(temperature=1e-40),
]


@pytest.fixture(scope="module")
def limited(start_server):
    with start_server(*LIMITS) as srv:
        yield srv


def test_malformed_requests_are_4xx_never_5xx(limited) -> None:
    failures = []
    for what, path, body, status, param, code in MALFORMED:
        resp = raw(limited, path, body)
        err = (
            resp.json().get("error", {})
            if resp.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        ok = (
            resp.status_code == status
            and (param is None or err.get("param") == param)
            and (code is None or err.get("code") == code)
        )
        if not ok:
            failures.append((what, resp.status_code, resp.text[:200]))
    assert not failures, failures
    for body in ACCEPTED:
        resp = raw(limited, "/v1/chat/completions", body)
        assert resp.status_code == 200, resp.text


def test_a_tiny_temperature_does_not_fail_its_batch_mates(limited) -> None:
    """Before: logits / 1e-40 overflowed, the sampler raised and every row of the batch got a 500."""

    async def fire() -> list[httpx.Response]:
        bodies = [chat(max_tokens=24, temperature=t) for t in (0, 1e-40, 0.7, 1e-30)]
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{limited.v1}/chat/completions",
                        content=b,
                        headers={"content-type": "application/json"},
                    )
                    for b in bodies
                )
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    greedy = responses[0].json()["choices"][0]["message"]["content"]
    assert responses[1].json()["choices"][0]["message"]["content"] == greedy
    assert limited.metric("arenaflow_batch_size_peak") > 1


def _wait_idle(srv, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while srv.metric("arenaflow_scheduler_running") and time.time() < deadline:
        time.sleep(0.05)


def test_a_client_that_leaves_a_plain_request_frees_its_rows(server) -> None:
    """Non-streaming: closing the socket cancels generation (before: it ran to max_tokens)."""
    _wait_idle(server)
    cancelled = server.metric("arenaflow_scheduler_cancelled_total")
    tokens = server.metric("arenaflow_scheduler_tokens_generated_total")
    body = json.dumps(
        {
            **CHAT,
            "max_tokens": 1800,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Count"}],
        }
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        deadline = time.time() + 20
        while server.metric("arenaflow_scheduler_running") == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert server.metric("arenaflow_scheduler_running") == 1
    _wait_idle(server)
    assert server.metric("arenaflow_scheduler_running") == 0
    assert server.metric("arenaflow_scheduler_cancelled_total") == cancelled + 1
    assert server.metric("arenaflow_scheduler_tokens_generated_total") - tokens < 1800


def test_every_request_has_a_time_limit(start_server) -> None:
    with start_server("serve.request_timeout_s=0.5") as srv:
        long = {**CHAT, "max_tokens": 1800, "temperature": 0}
        t0 = time.perf_counter()
        resp = raw(srv, "/v1/chat/completions", json.dumps(long))
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["code"] == "timeout" and time.perf_counter() - t0 < 10
        with httpx.stream(
            "POST", f"{srv.v1}/chat/completions", json={**long, "stream": True}, timeout=30
        ) as stream:
            assert stream.status_code == 200
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        last = json.loads(events[-1].removeprefix("data: "))
        assert last["error"]["code"] == "timeout", events[-3:]
        _wait_idle(srv)
        assert srv.metric("arenaflow_scheduler_running") == 0


def test_keys_guard_metrics_and_ready_details_and_odd_headers(start_server) -> None:
    with start_server("serve.api_keys=[k-123]") as srv:
        good = {"authorization": "Bearer k-123"}
        for header in (
            b"Bearer \xff\xfe\xfd",
            b"\xc3\xa9t\xc3\xa9",
            b"",
            b"Bearer",
            b"k-123",
            b"Basic k-123",
        ):
            resp = raw(srv, "/v1/chat/completions", chat(), headers={"authorization": header})
            assert resp.status_code == 401, (header, resp.text)
        assert raw(srv, "/v1/chat/completions", chat(), headers=good).status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        assert "arenaflow_ready" in httpx.get(f"{srv.url}/metrics", headers=good).text
        assert httpx.get(f"{srv.url}/health").status_code == 200
        bare = httpx.get(f"{srv.url}/ready")
        assert bare.status_code == 200 and bare.json() == {"status": "ready"}
        detailed = httpx.get(f"{srv.url}/ready", headers=good).json()
        assert detailed["models"][0]["root"] and "memory" in detailed
    with start_server("serve.api_keys=[k-123]", "serve.public_metrics=true") as srv:
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
        assert "models" in httpx.get(f"{srv.url}/ready").json()


def test_a_foreign_host_header_is_refused(server) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends Host: evil.example."""
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        resp = httpx.get(f"{server.v1}/models", headers={"host": host})
        assert resp.status_code == 400, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{server.v1}/models", headers={"host": host}).status_code == 200, host
