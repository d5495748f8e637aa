"""Tool calling on /v1/chat/completions: tools into the prompt, calls out of the text, forced calls.

Prompt. Tools and the history's tool calls and results go through the model's own chat template
(`apply_chat_template(tools=...)`) when that template shows tools to the model (found by rendering
a probe tool once per template). A template without tool support (SmolLM2's, Vicuna's) gets
`FALLBACK_PROMPT` (Qwen2.5's and Hermes' tool prompt) added to its system turn, earlier calls
written into the assistant turns as the blocks below, and tool results as a user turn of
`<tool_response>` blocks.

Output format (what is parsed, and what a forced call is constrained to):

    <tool_call>
    {"name": "<function name>", "arguments": {<arguments object>}}
    </tool_call>

one block per call; the text outside the blocks is the message content. `tool_choice: "required"`
or a named function compile this format, with each function's parameters schema for its arguments,
into a grammar (`tool_call_grammar`) the engine decodes under, so even a random model emits a valid
call (a named function is called once; "required" allows several unless parallel calls are off).
`"auto"` parses what the model wrote; `parallel_tool_calls: false` stops it after one call. With a
forced call, the call is the answer: a `response_format` of the same request is not applied.
Splitting text into content and calls (`ToolCallStream`) is in tool_stream.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from arenaflow.engine.constraints import Constraint, InvalidConstraintError
from arenaflow.serve.errors import APIError
from arenaflow.serve.schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice, ToolDef
from arenaflow.serve.tool_stream import CLOSE, OPEN, ToolCall, ToolCallStream

FALLBACK_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""
ONE_CALL = "\n\nCall at most one function per answer."

# JSON as json.dumps writes it, no free whitespace: a small model cannot spend its budget on blanks
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_PROBE = "arenaflow_probe_tool"
_native: dict[str, bool] = {}  # chat template text -> does it show tools to the model


@dataclass
class ToolPlan:
    """A request's tools as the server uses them: offered, parsed, and maybe forced."""

    tools: list[ToolDef]
    choice: str  # "auto" | "required" | a function name
    parallel: bool

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolPlan | None:
        """None when no tools are offered (none sent, or tool_choice "none")."""
        choice = body.tool_choice or "auto"
        if not body.tools or choice == "none":
            return None
        name = choice if isinstance(choice, str) else choice.function.name
        return cls(body.tools, name, body.parallel_tool_calls is not False)

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def forced(self) -> list[ToolDef]:
        """The tools the output must call one of (none under "auto")."""
        if self.choice == "auto":
            return []
        if self.choice == "required":
            return self.tools
        return [t for t in self.tools if t.function.name == self.choice]

    def constraint(self) -> Constraint | None:
        """The grammar of a forced answer: calls of the required tools, or one of the named one."""
        forced = self.forced()
        if not forced:
            return None
        return Constraint.lark(
            tool_call_grammar(forced, self.parallel and self.choice == "required")
        )

    def checked_constraint(self, engine: Any) -> Constraint | None:
        """The constraint, compiled now (then cached): a parameters schema the grammar library
        refuses is a 400 naming `tools` before anything is queued."""
        constraint = self.constraint()
        if constraint is not None:
            try:
                engine.constraints.compile(constraint)
            except InvalidConstraintError as e:
                raise _bad(f"a tool's parameters cannot be decoded under: {e}", "tools") from e
        return constraint

    def stops(self) -> list[str]:
        """Without parallel calls a free ("auto") answer ends with its first call."""
        return [] if self.parallel or self.forced() else [CLOSE]

    def split(self, text: str, finish_reason: str) -> tuple[str | None, list[ToolCall], str]:
        """A whole answer's content, its tool calls and its finish_reason."""
        stream = ToolCallStream(self.names)
        stream.feed(text)
        stream.finish()
        return stream.text() or None, stream.calls, finish_for(stream.calls, finish_reason)


def finish_for(calls: list[ToolCall], finish_reason: str) -> str:
    """OpenAI's "tool_calls" for an answer that ends in calls; a cut answer stays "length"."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def check_tools(body: ChatCompletionRequest) -> None:
    """400s for tools, tool choices and tool messages that do not fit together."""
    seen: set[str] = set()
    for i, tool in enumerate(body.tools or []):
        name = tool.function.name
        if name in seen:
            raise _bad(
                f"tools[{i}]: a function named {name!r} is defined twice; names must be unique",
                "tools",
            )
        seen.add(name)
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in seen:
        raise _bad(
            f"tool_choice names {choice.function.name!r}, which is not one of the tools "
            f"({', '.join(sorted(seen)) or 'none sent'})",
            "tool_choice",
        )
    if choice == "required" and not seen:
        raise _bad('tool_choice "required" needs tools; send tools or leave it out', "tool_choice")
    call_ids: set[str] = set()
    for i, m in enumerate(body.messages):
        call_ids.update(c.id for c in m.tool_calls or [])
        if m.role == "tool" and m.tool_call_id not in call_ids:
            raise _bad(
                f"messages[{i}] answers tool call {m.tool_call_id!r}, but no earlier assistant "
                "message made a call with that id",
                f"messages[{i}].tool_call_id",
            )


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def tool_chars(body: ChatCompletionRequest) -> int:
    """Characters of tool definitions and earlier calls (counted in serve.max_input_chars)."""
    tools = sum(len(t.model_dump_json()) for t in body.tools or [])
    calls = sum(len(c.function.arguments) for m in body.messages for c in m.tool_calls or [])
    return tools + calls


# -- grammar ---------------------------------------------------------------------------------------
def tool_call_grammar(tools: list[ToolDef], parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) of one call, or several, of one of `tools`."""
    tail = json.dumps("}\n" + CLOSE)
    rules = []
    for i, tool in enumerate(tools):
        schema = tool.function.schema()
        schema = {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}
        head = json.dumps(f'{OPEN}\n{{"name": "{tool.function.name}", "arguments": ')
        rules.append(f"call_{i}: {head} %json {json.dumps(schema)} {tail}")
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, "call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules])


# -- prompt ----------------------------------------------------------------------------------------
def shows_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template puts tool definitions into the prompt."""
    key = str(tokenizer.chat_template)
    if key not in _native:
        probe = {"type": "function", "function": {"name": _PROBE, "parameters": {"type": "object"}}}
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}],
                tools=[probe],
                tokenize=False,
                add_generation_prompt=True,
            )
            _native[key] = _PROBE in text
        except Exception:  # a template that cannot take tools at all
            _native[key] = False
    return _native[key]


def render_chat(tokenizer: Any, messages: list[ChatMessage], plan: ToolPlan | None) -> str:
    """The prompt, tools and tool history included, in the model's template (or the fallback)."""
    native = shows_tools(tokenizer) if plan or _has_tool_history(messages) else False
    tools = [t.model_dump(exclude_none=True) for t in plan.tools] if plan else None
    if native:
        turns = [_native_turn(m, messages) for m in messages]
        return tokenizer.apply_chat_template(
            turns, tools=tools, tokenize=False, add_generation_prompt=True
        )
    turns = _fallback_turns(messages)
    if tools:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        prompt += "" if plan is None or plan.parallel else ONE_CALL
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def _has_tool_history(messages: list[ChatMessage]) -> bool:
    return any(m.role == "tool" or m.tool_calls for m in messages)


def _role(m: ChatMessage) -> str:
    return "system" if m.role == "developer" else m.role


def _native_turn(m: ChatMessage, messages: list[ChatMessage]) -> dict[str, Any]:
    """A message as Hugging Face templates take it (tool call arguments as objects)."""
    turn: dict[str, Any] = {"role": _role(m), "content": m.text()}
    if m.tool_calls:
        turn["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": _arguments(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.role == "tool":
        turn["tool_call_id"] = m.tool_call_id
        names = {c.id: c.function.name for x in messages for c in x.tool_calls or []}
        turn["name"] = names.get(m.tool_call_id or "", "")
    return turn


def _fallback_turns(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Calls written into assistant turns as blocks; consecutive tool results as one user turn."""
    turns: list[dict[str, str]] = []
    after_tool = False
    for m in messages:
        text = m.text()
        if m.role == "tool":
            block = f"<tool_response>\n{text}\n</tool_response>"
            if after_tool:
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block})
            after_tool = True
            continue
        blocks = [_call_block(c.function.name, c.function.arguments) for c in m.tool_calls or []]
        turns.append({"role": _role(m), "content": "\n".join([text] * bool(text) + blocks)})
        after_tool = False
    return turns


def _call_block(name: str, arguments: str) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': _arguments(arguments)})}\n{CLOSE}"


def _arguments(text: str) -> Any:
    """Arguments as an object where they parse as one (templates expect it), else as sent."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text
