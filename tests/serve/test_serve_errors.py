"""Client mistakes get OpenAI-style errors with the right status; keys, backpressure, batching, disconnects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from openai import OpenAI

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30, **kw)


def assert_error(
    resp: httpx.Response, status: int, *, param: str | None = None, says: str = ""
) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert says.lower() in err["message"].lower(), err
    return err


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": 0}, "max_tokens", ""),
        ({"max_tokens": 10**9}, "max_tokens", "context window is 2048"),
        ({"max_completion_tokens": 10**6}, "max_tokens", "context window is 2048"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"temperature": -0.1}, "temperature", ""),
        ({"top_p": 0}, "top_p", ""),
        ({"messages": []}, "messages", "at least one message"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "unknown role"),
        ({"messages": "hello"}, "messages", ""),
        ({"n": 0}, "n", ""),
        ({"n": 99}, "n", "n must be <="),
        ({"top_logprobs": 3}, None, "requires logprobs"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs", ""),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"model": None}, "model", ""),
    ],
)
def test_invalid_chat_values_are_400(server, change, param, says) -> None:
    body = {**CHAT, **change}
    if change.get("model", "") is None:
        del body["model"]
    err = assert_error(post(server, "/v1/chat/completions", body), 400, param=param, says=says)
    assert err["type"] == "invalid_request_error"


def test_prompt_longer_than_context_says_the_limit(server) -> None:
    long = "word " * 3000
    resp = post(
        server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long}]}
    )
    err = assert_error(resp, 400, param="messages", says="context window is 2048 tokens")
    assert err["code"] == "context_length_exceeded"
    resp = post(server, "/v1/completions", {"model": "tiny-chat", "prompt": long})
    assert_error(resp, 400, param="prompt", says="2048")


def test_malformed_json_and_wrong_shapes_are_400(server) -> None:
    assert_error(
        post(server, "/v1/chat/completions", b'{"model": "tiny-chat", "messages": ['),
        400,
        says="not valid JSON",
    )
    assert_error(post(server, "/v1/chat/completions", b"[1, 2]"), 400)
    assert_error(
        post(server, "/v1/completions", {"model": "tiny-chat", "prompt": []}), 400, param="prompt"
    )
    assert_error(
        post(server, "/v1/completions", {"model": "tiny-chat", "prompt": "x", "echo": True}),
        400,
        param="echo",
    )


def test_unknown_model_and_route_are_404(server) -> None:
    err = assert_error(
        post(server, "/v1/chat/completions", {**CHAT, "model": "gpt-7"}),
        404,
        param="model",
        says="gpt-7",
    )
    assert err["code"] == "model_not_found"
    assert_error(httpx.get(f"{server.url}/v1/models/gpt-7"), 404, param="model")
    assert_error(httpx.get(f"{server.url}/v1/nothing-here"), 404, says="no such endpoint")
    with pytest.raises(openai.NotFoundError):
        OpenAI(base_url=server.v1, api_key="x", max_retries=0).chat.completions.create(
            model="gpt-7", messages=[{"role": "user", "content": "hi"}]
        )


def test_body_above_limit_is_413(server) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert_error(post(server, "/v1/chat/completions", big), 413, says="larger than 1048576 bytes")

    def chunked():  # no Content-Length: the limit is counted while reading
        yield json.dumps(big).encode()

    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunked(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_error(resp, 413)
    assert (
        server.metric('arenaflow_requests_total{endpoint="/v1/chat/completions",status="413"}') >= 2
    )


def test_api_keys(start_server, monkeypatch) -> None:
    monkeypatch.setenv("ARENAFLOW_API_KEYS", "env-key-1, env-key-2")
    with start_server("serve.api_keys=[cfg-key]") as srv:
        assert_error(post(srv, "/v1/chat/completions", CHAT), 401, says="missing API key")
        bad = post(srv, "/v1/chat/completions", CHAT, headers={"authorization": "Bearer nope"})
        assert_error(bad, 401, says="incorrect API key")
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/ready").status_code == 200
        assert_error(httpx.get(f"{srv.v1}/models"), 401)
        for key in ("cfg-key", "env-key-2"):
            out = OpenAI(base_url=srv.v1, api_key=key, max_retries=0).chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=srv.v1, api_key="wrong", max_retries=0).models.list()


async def _fire(url: str, n: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/v1/chat/completions", json=body) for _ in range(n))
        )


def test_full_queue_is_429_with_retry_after(start_server) -> None:
    with start_server(
        "serve.max_batch_size=1", "serve.max_queue=1", "serve.retry_after_s=7"
    ) as srv:
        body = {**CHAT, "max_tokens": 48, "temperature": 0}
        responses = asyncio.run(_fire(srv.url, 8, body))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        assert set(codes) <= {200, 429}
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["retry-after"] == "7"  # serve.retry_after_s
        assert_error(limited, 429, says="queue is full")
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert srv.metric("arenaflow_scheduler_rejected_total") >= 1


def test_concurrent_requests_share_decode_steps(server) -> None:
    before = server.metric("arenaflow_requests_total")
    body = {**CHAT, "max_tokens": 32, "temperature": 0}
    responses = asyncio.run(_fire(server.url, 8, body))
    assert all(r.status_code == 200 for r in responses)
    texts = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(texts) == 1, "batched greedy requests must agree"
    assert server.metric("arenaflow_batch_size_peak") > 1
    assert server.metric("arenaflow_requests_total") >= before + 8
    assert server.metric("arenaflow_time_to_first_token_seconds_count") >= 8
    assert server.metric("arenaflow_generation_tokens_total") >= 8
    assert server.metric("arenaflow_scheduler_queue_depth") == 0


def test_client_leaving_a_stream_frees_its_slot(server) -> None:
    cancelled = server.metric("arenaflow_scheduler_cancelled_total")
    body = {**CHAT, "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert got[0].startswith("data: {")
    deadline = time.time() + 20
    while time.time() < deadline:
        if server.metric("arenaflow_scheduler_running") == 0:
            break
        time.sleep(0.1)
    assert server.metric("arenaflow_scheduler_running") == 0
    assert server.metric("arenaflow_scheduler_cancelled_total") >= cancelled + 1
