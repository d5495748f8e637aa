"""Tool calling: tools in the prompt, calls split from the text, forced calls, via a real server."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from arenaflow.engine import Engine, SamplingParams
from arenaflow.engine.constraints import ConstraintCompiler
from arenaflow.serve.schemas import ChatCompletionRequest
from arenaflow.serve.tool_stream import ToolCallStream
from arenaflow.serve.tools import FALLBACK_PROMPT, ToolPlan, render_chat, shows_tools

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: no arguments
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# a template that shows tools (as Qwen's and Llama 3.1's do), to check the native path
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "m", "messages": ASK, "tools": TOOLS, **fields})


def history(call_id: str = "call_1") -> list[dict]:
    call = {"id": call_id, "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    return [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ]


def engine_answer(engine: Engine, body: ChatCompletionRequest, max_tokens: int) -> str | None:
    """What the server should answer (greedy, tools offered as the route offers them)."""
    plan = ToolPlan.of(body)
    prompt = render_chat(engine.tokenizer, body.messages, plan)
    text = engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens))[0].choices[0].text
    return text if plan is None else text.strip() or None  # with tools, content is split out


def check_call(name: str, arguments: str) -> None:
    schema = WEATHER if name == "get_weather" else {"type": "object", "maxProperties": 0}
    jsonschema.validate(json.loads(arguments), schema)


# -- splitting text into content and calls ---------------------------------------------------------
ANSWER = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "note": "a } in </ text"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"arguments": {"city": "Rome"}, "name": "get_weather"}\n</tool_call>\n'
    '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>'
)


def test_a_stream_splits_content_from_calls_as_the_whole_text_does() -> None:
    stream, deltas = ToolCallStream({"get_weather"}), []
    for ch in ANSWER:  # one character at a time: tags and JSON arrive split
        deltas += stream.feed(ch)
    deltas += stream.finish()
    content = "".join(d["content"] for d in deltas if "content" in d)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            call = calls.setdefault(c["index"], {"arguments": ""})
            call.update({k: c[k] for k in ("id", "type") if k in c})
            call["name"] = c["function"].get("name", call.get("name"))
            call["arguments"] += c["function"]["arguments"]
    # a call of an undeclared function stays text; the rest is content around the calls
    assert (
        content
        == 'Let me look.\n\n\n<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>'
    )
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "note": "a } in </ text"}
    assert json.loads(calls[1]["arguments"]) == {"city": "Rome"}  # read whole: name came last
    arg_chunks = [d for d in deltas if d.get("tool_calls", [{}])[0].get("index") == 0]
    assert len(arg_chunks) > 5  # the first call's arguments streamed as they came
    assert all(c["id"].startswith("call_") for c in calls.values())
    plan = ToolPlan.of(request())
    whole_content, whole_calls, finish = plan.split(ANSWER, "stop")
    assert whole_content == content and finish == "tool_calls"
    assert [c.arguments for c in whole_calls] == [c["arguments"] for c in calls.values()]


def test_a_call_cut_short_keeps_what_it_has_and_plain_text_stays_content() -> None:
    plan = ToolPlan.of(request())
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    content, calls, finish = plan.split(cut, "length")
    assert content is None and calls[0].arguments == '{"city": "Pa' and finish == "length"
    assert plan.split("  no call <tool here  ", "stop") == ("no call <tool here", [], "stop")


# -- the prompt and the grammar --------------------------------------------------------------------
def test_a_template_without_tools_gets_the_fallback_prompt_and_tool_history(
    serve_engine: Engine,
) -> None:
    tok = serve_engine.tokenizer  # SmolLM2's template ignores `tools`
    assert not shows_tools(tok)
    body = request(messages=history())
    prompt = render_chat(tok, body.messages, ToolPlan.of(body))
    assert FALLBACK_PROMPT.split("{tools}")[0] in prompt
    assert json.dumps(TOOLS[0]) in prompt  # the definitions, verbatim
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in (
        prompt
    )
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    plain = render_chat(tok, body.messages, None)  # tool_choice "none": tools not offered
    assert "<tools>" not in plain and "<tool_response>" in plain


def test_a_template_with_tools_renders_them_itself(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TOOL_TEMPLATE
    assert shows_tools(tok)
    body = request(messages=history())
    prompt = render_chat(tok, body.messages, ToolPlan.of(body))
    assert "TOOLS: get_weather get_time" in prompt and "<tools>" not in prompt
    assert 'CALL get_weather {"city": "Paris"}' in prompt  # arguments handed over as an object
    assert "<|im_start|>tool\nsunny, 21 C" in prompt


def test_the_call_grammar_allows_several_calls_only_with_parallel_calls(
    serve_engine: Engine,
) -> None:
    compiler = ConstraintCompiler(
        serve_engine.tokenizer, serve_engine.eos_ids, len(serve_engine.tokenizer)
    )
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    time = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'

    def accepts(plan: ToolPlan, text: str) -> bool:
        ids = serve_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        return compiler.compile(plan.constraint()).matcher().validate_tokens(ids) == len(ids)

    parallel = ToolPlan.of(request(tool_choice="required"))
    single = ToolPlan.of(request(tool_choice="required", parallel_tool_calls=False))
    assert accepts(parallel, f"{one}\n{time}") and accepts(single, one)
    assert not accepts(single, f"{one}\n{time}")
    named = ToolPlan.of(request(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert accepts(named, time) and not accepts(named, one)
    assert not accepts(single, one.replace("Rome", "Oslo"))  # arguments obey the schema


# -- through the server ----------------------------------------------------------------------------
def test_round_trip_forced_call_then_tool_result_then_answer(
    client: OpenAI, serve_engine: Engine
) -> None:
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    check_call(call.function.name, call.function.arguments)
    messages = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    final = client.chat.completions.create(
        model="tiny-chat", messages=messages, tools=TOOLS, max_tokens=6, temperature=0
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None
    expected = engine_answer(serve_engine, request(messages=messages), 6)  # the result was read
    assert final.choices[0].message.content == expected


def test_round_trip_streamed(client: OpenAI, serve_engine: Engine) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
            stream=True,
        )
    )
    parts = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert {p.index for p in parts} == {0} and len(parts) > 2  # id and name, then arguments
    assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
    assert all(p.id is None and p.function.name is None for p in parts[1:])
    arguments = "".join(p.function.arguments or "" for p in parts)
    check_call(parts[0].function.name, arguments)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # content withheld
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = {"name": parts[0].function.name, "arguments": arguments}
    messages = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [{"id": parts[0].id, "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": parts[0].id, "content": "21 C"},
    ]
    final = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=messages,
            tools=TOOLS,
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    assert final[-1].choices[0].finish_reason in ("stop", "length")
    assert not any(c.choices[0].delta.tool_calls for c in final)
    streamed = "".join(c.choices[0].delta.content or "" for c in final) or None
    assert streamed == engine_answer(serve_engine, request(messages=messages), 6)


def test_each_streamed_choice_gets_its_own_calls_and_logprobs(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            n=2,
            temperature=1.0,
            seed=5,
            max_tokens=40,
            logprobs=True,
            stream=True,
        )
    )
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        parts = [tc for ch in mine for tc in ch.delta.tool_calls or []]
        assert parts[0].id.startswith("call_")
        check_call(parts[0].function.name, "".join(p.function.arguments or "" for p in parts))
        assert sum(len(ch.logprobs.content) for ch in mine if ch.logprobs) >= len(parts) - 1
        assert mine[-1].finish_reason == "tool_calls"


def test_required_forces_a_valid_call_in_every_choice(client: OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=2,
        temperature=1.0,
        seed=11,
        max_tokens=40,
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        check_call(call.function.name, call.function.arguments)


def test_none_offers_no_tools_and_auto_offers_them(client: OpenAI, serve_engine: Engine) -> None:
    for choice in ("none", "auto"):
        out = client.chat.completions.create(
            model="tiny-chat",
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=8,
            temperature=0,
        )
        assert out.choices[0].message.content == engine_answer(
            serve_engine, request(tool_choice=choice), 8
        )
    plain = serve_engine.render_chat(ASK)
    assert render_chat(serve_engine.tokenizer, request(tool_choice="none").messages, None) == plain


LOOKBEHIND = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}
BAD = [
    # (what, change to the request, param)
    (
        "a tool without a name",
        {"tools": [{"type": "function", "function": {}}]},
        "tools[0].function.name",
    ),
    (
        "a bad name",
        {"tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools[0].function.name",
    ),
    (
        "parameters that are not a schema",
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        "parameters not of an object",
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        "a forced call's parameters the grammar library refuses",
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": LOOKBEHIND}}],
            "tool_choice": "required",
        },
        "tools",
    ),
    ("two tools of one name", {"tools": [TOOLS[1], TOOLS[1]]}, "tools"),
    ("a tool that is not a function", {"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    (
        "tool_choice naming an unknown function",
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("required without tools", {"tools": None, "tool_choice": "required"}, "tool_choice"),
    (
        "a tool result without its call",
        {"messages": history()[:1] + history()[2:]},
        "messages[1].tool_call_id",
    ),
    (
        "a tool result without tool_call_id",
        {"messages": [*ASK, {"role": "tool", "content": "x"}]},
        "messages[1]",
    ),
    (
        "tool calls on a user message",
        {"messages": [{**ASK[0], "tool_calls": history()[1]["tool_calls"]}]},
        "messages[0]",
    ),
]


@pytest.mark.parametrize("what,change,param", BAD, ids=[b[0] for b in BAD])
def test_invalid_tools_and_tool_messages_are_400s(server, what, change, param) -> None:
    body = {"model": "tiny-chat", "messages": ASK, "tools": TOOLS, "max_tokens": 2, **change}
    resp = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()


def test_tool_definitions_count_toward_the_input_limit(start_server) -> None:
    big = {"type": "function", "function": {"name": "f", "description": "x" * 500}}
    with start_server("serve.max_input_chars=400") as srv:
        body = {"model": "tiny-chat", "messages": ASK, "tools": [big], "max_tokens": 2}
        resp = httpx.post(f"{srv.v1}/chat/completions", json=body, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "request_too_large"
