"""A scripted OpenAI-compatible stand-in judge (real HTTP on a loopback port) and small hand-made
MT-bench questions and answers in FastChat's formats, for the judge tests.

Faults come from a script (one action per request) or, with `Faults`, are drawn for a share of
requests from a seeded generator keyed by the prompt and how often it was asked, so a prompt meets
the same faults whatever order concurrent requests arrive in. The stand-in counts requests and
delivered completions per prompt: what a paid API would bill."""

from __future__ import annotations

import asyncio
import math
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from arenaflow import io

GOOD, MEH = "GOOD", "meh"
VERDICTLESS = "I cannot decide; both answers have merit."

# What `Faults` draws from: 429 with and without Retry-After, 500, 503, a reply that never comes
# (the client times out), a 200 whose JSON body is cut off, and a paid reply without a verdict.
FAULTS = ("429", "429-bare", "500", "503", "timeout", "truncated", "verdictless")


@dataclass
class Faults:
    """A seeded share of faulty replies: the n-th request of a prompt gets the same action in
    every run, whatever the order concurrent requests arrive in."""

    seed: int = 0
    rate: float = 0.3
    kinds: tuple[str, ...] = FAULTS

    def action(self, prompt: tuple[str, bool], n: int) -> str:
        rng = random.Random(f"{self.seed}|{prompt[1]}|{n}|{prompt[0]}")
        return rng.choice(self.kinds) if rng.random() < self.rate else "ok"


@dataclass
class StandIn:
    """The stand-in's state: `script` is consumed one action per request, then `faults` (when
    set) or default replies. Per prompt (the user message, and whether it is the verdict-only
    follow-up): `requests` sent, `completions` delivered (a well-formed 200: what is billed)."""

    url: str
    script: list[str] = field(default_factory=list)
    hits: list[dict[str, Any]] = field(default_factory=list)
    auth: set[str] = field(default_factory=set)
    policy: Callable[[dict[str, Any]], str] | None = None  # the reply text; None: default_reply
    faults: Faults | None = None
    requests: Counter = field(default_factory=Counter)
    completions: Counter = field(default_factory=Counter)
    verdictless: set[tuple[str, bool]] = field(default_factory=set)  # delivered without a verdict
    tokens: int = 0  # prompt + completion tokens of delivered completions
    hold_after: int | None = None  # once this many completions were delivered, hold new requests
    active: int = 0  # requests being answered now
    held: int = 0  # of which held until the client goes away


def section(text: str, name: str) -> str | None:
    """The text between FastChat's `[The Start of <name>]` and `[The End of <name>]` markers."""
    start, end = f"[The Start of {name}]\n", f"\n[The End of {name}]"
    i = text.find(start)
    j = text.find(end, i + len(start)) if i != -1 else -1
    return text[i + len(start) : j] if j != -1 else None


def reference_reply(system: str, user: str) -> str | None:
    """A judge that knows the reference: the answer equal to it wins (calibration anchors)."""
    ref = section(user, "Reference Answer")
    if ref is None:
        return None
    if "[[A]]" in system:
        a, b = section(user, "Assistant A's Answer"), section(user, "Assistant B's Answer")
        if a == ref != b:
            return "A matches the reference. [[A]]"
        if b == ref != a:
            return "B matches the reference. [[B]]"
        return None
    if section(user, "Assistant's Answer") == ref:
        return "Matches the reference. Rating: [[9]]"
    return None


def default_reply(body: dict[str, Any]) -> str:
    """Deterministic verdicts that depend on the answers, not their position: the reference
    answer beats anything else, GOOD beats meh."""
    system = body["messages"][0]["content"]
    user = body["messages"][1]["content"]
    by_reference = reference_reply(system, user)
    if by_reference is not None:
        return by_reference
    if "[[A]]" in system:
        first_good = user.find(GOOD)
        b_start = user.find("Assistant B")
        if first_good == -1:
            return "Both are equally mediocre. [[C]]"
        return "A is better. [[A]]" if first_good < b_start else "B is better. [[B]]"
    return "Solid answer. Rating: [[8]]" if GOOD in user else "Weak answer. Rating: [[3]]"


def logprob_reply(body: dict[str, Any]) -> dict[str, Any]:
    """A follow-up asking for the verdict only: `[[` then a verdict token with its alternatives."""
    rating = "rating" in body["messages"][-1]["content"]
    top = (
        [("6", -0.2231435513), ("7", -1.6094379124)]
        if rating
        else [("B", -0.1053605157), ("A", -2.302585093)]
    )
    content = [
        {"token": "[[", "logprob": -0.01, "bytes": None, "top_logprobs": []},
        {
            "token": top[0][0],
            "logprob": top[0][1],
            "bytes": None,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top],
        },
    ]
    return {"content": f"[[{top[0][0]}]]", "logprobs": {"content": content}}


def verdict_alternatives(token: str) -> list[tuple[str, float]]:
    """A judge that is fairly sure: 0.7 on its verdict, the rest on the neighbours."""
    if token.isdigit():
        n = int(token)
        return [
            (token, math.log(0.7)),
            (str(max(1, n - 1)), math.log(0.2)),
            (str(min(9, n + 1)), math.log(0.1)),
        ]
    others = [t for t in "ABC" if t != token]
    return [(token, math.log(0.8)), (others[0], math.log(0.15)), (others[1], math.log(0.05))]


def token_logprobs(text: str) -> list[dict[str, Any]]:
    """OpenAI's per-token logprobs for a reply: `[[`, `]]`, digits and runs of other characters
    as tokens; the token after `[[` has the verdict alternatives."""
    out, previous = [], ""
    for tok in re.findall(r"\[\[|\]\]|\d|[^\[\]\d]+|[\[\]]", text):
        top = verdict_alternatives(tok) if previous == "[[" else [(tok, 0.0)]
        out.append(
            {
                "token": tok,
                "logprob": top[0][1],
                "bytes": None,
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top],
            }
        )
        previous = tok
    return out


def make_app(state: StandIn) -> FastAPI:
    app = FastAPI()
    lock = threading.Lock()

    async def until_gone(request: Request, limit: float = 30.0) -> None:
        """Hold a request, never answering it, until its client disconnects."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not await request.is_disconnected():
            await asyncio.sleep(0.02)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        state.auth.add(request.headers.get("authorization", ""))
        followup = len(body["messages"]) > 2  # the verdict-only follow-up of recovery
        prompt = (body["messages"][1]["content"], followup)
        with lock:
            n = state.requests[prompt]
            state.requests[prompt] += 1
            if state.script:
                action = state.script.pop(0)
            elif state.faults is not None:
                action = state.faults.action(prompt, n)
            else:
                action = "ok"
            hold = state.hold_after is not None and state.completions.total() >= state.hold_after
            state.hits.append(
                {"action": action, "logprobs": bool(body.get("logprobs")), "followup": followup}
            )
            state.active += 1
            state.held += hold
        try:
            if hold:
                await until_gone(request)
                return Response(status_code=503)
            return await answer(request, body, action, prompt)
        finally:
            with lock:
                state.active -= 1
                state.held -= hold

    async def answer(
        request: Request, body: dict[str, Any], action: str, prompt: tuple[str, bool]
    ) -> Response:
        followup = prompt[1]
        if action == "429":
            return JSONResponse(
                {"error": {"message": "rate limited"}},
                status_code=429,
                headers={"Retry-After": "0.05"},
            )
        if action in ("429-day", "429-inf"):  # a server asking for a very long (or no) end
            wait = "86400" if action == "429-day" else "inf"
            return JSONResponse(
                {"error": {"message": "rate limited"}},
                status_code=429,
                headers={"Retry-After": wait},
            )
        if action in ("400", "401"):
            return JSONResponse({"error": {"message": "refused"}}, status_code=int(action))
        if action == "429-bare":  # no Retry-After: the client's own backoff decides
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429)
        if action in ("500", "503"):
            return JSONResponse({"error": {"message": "boom"}}, status_code=int(action))
        if action == "timeout":
            await until_gone(request)
            return Response(status_code=504)
        if action in ("hang", "slow"):
            await asyncio.sleep(4.0 if action == "hang" else 0.2)
        logprobs = None
        if followup and body.get("logprobs") and action != "verdictless":
            reply = logprob_reply(body)
            text, logprobs = reply["content"], reply["logprobs"]
        elif action in ("malformed", "verdictless"):
            text = VERDICTLESS
        else:
            text = (state.policy or default_reply)(body)
        if body.get("logprobs") and logprobs is None:
            logprobs = {"content": token_logprobs(text)}
        completion_tokens = min(10, int(body.get("max_tokens") or 10))
        payload = {
            "id": f"cmpl-{len(state.hits)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": logprobs,
                }
            ],
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": completion_tokens,
                "total_tokens": 100 + completion_tokens,
            },
        }
        if action == "truncated":  # a 200 cut off in transit: the client cannot read it
            body_bytes = JSONResponse(payload).body
            return Response(body_bytes[: len(body_bytes) // 2], media_type="application/json")
        if await request.is_disconnected():
            return Response(status_code=499)  # the client gave up first: nothing delivered
        with lock:
            state.completions[prompt] += 1
            state.tokens += 100 + completion_tokens
            if text == VERDICTLESS:
                state.verdictless.add(prompt)
        return JSONResponse(payload)

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stand_in() -> tuple[StandIn, uvicorn.Server, threading.Thread]:
    port = free_port()
    state = StandIn(url=f"http://127.0.0.1:{port}/v1")
    server = uvicorn.Server(
        uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "stand-in judge server did not start"
    return state, server, thread


def write_inputs(root: Path, question_ids: tuple[int, ...] = (81, 111)) -> dict[str, Any]:
    """MT-bench questions from the package plus hand-made answers: `finetuned` GOOD, `base` meh."""
    from arenaflow.judge.prompts import package_data_dir

    wanted = set(question_ids)
    questions = [
        q
        for q in io.read_jsonl(io.join(package_data_dir(), "mt_bench", "question.jsonl"))
        if q["question_id"] in wanted
    ]
    q_uri = str(root / "question.jsonl")
    io.write_jsonl(q_uri, questions)
    answers = {}
    for model, word in (("finetuned", GOOD), ("base", MEH)):
        rows = [
            {
                "question_id": q["question_id"],
                "answer_id": f"{model}-{q['question_id']}",
                "model_id": model,
                "choices": [{"index": 0, "turns": [f"{word} answer one.", f"{word} answer two."]}],
                "tstamp": 0.0,
            }
            for q in questions
        ]
        answers[model] = str(root / f"{model}.jsonl")
        io.write_jsonl(answers[model], rows)
    return {"question_uri": q_uri, "answer_uris": answers, "questions": questions}


def api_overrides(url: str, **extra: Any) -> list[str]:
    base = {
        "judge": "openai_compatible",
        "judge.base_url": url,
        "judge.model": "stand-in-judge",
        "judge.concurrency": 4,
        "judge.timeout": 3.0,  # generous: a loaded CI machine must not time out normal replies
        "judge.backoff_base": 0.01,
        "judge.retries": 3,
        "judge.logprob_recovery": False,
        # These tests count the calls on the judged answers; the calibration's own calls are
        # tested in test_calibration.py (with no items the judge is uncalibrated).
        "judge.calibration.per_category": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_rows(uri: str) -> list[dict[str, Any]]:
    return list(io.read_jsonl(uri))


def all_text_under(root: Path) -> Iterator[tuple[Path, bytes]]:
    for p in root.rglob("*"):
        if p.is_file():
            yield p, p.read_bytes()


SENTINEL = "sk-test-" + "NEVER-LOGGED-0123456789"
