"""OpenAI-compatible request bodies (/v1/chat/completions, /v1/completions); responses are in responses.py.

Requests are validated here, so every client mistake becomes a 400 that names the field. Fields
OpenAI defines that change nothing here (`user`, `metadata`, `store`, ...) are accepted, so unmodified
OpenAI clients work; a field that would change the answer and that this server does not implement
(`functions`, `best_of`, `audio`, ...) is refused by `unsupported()` instead of
silently ignored (its null or default value is fine). Tool definitions are checked here (names,
parameters schemas); how tools, tool choices and tool messages fit together is `tools.check_tools`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from arenaflow.engine.constraints import Constraint

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 128  # each stop string is matched against the tail of every row at every step
MAX_LOGIT_BIAS = 1024  # tokens a request may bias: every step of its rows adds them all


def _encodable(v: str) -> str:
    """Text the tokenizer can take: a lone surrogate (JSON "\\ud800") is refused here, as a 400."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text holds an unpaired surrogate at position {e.start}; send valid Unicode"
        ) from None
    return v


Text = Annotated[str, AfterValidator(_encodable)]


def _is_default(*defaults: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == d for d in defaults)


# field -> "this value asks for nothing the server would ignore"
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": _is_default([]),
    "function_call": _is_default("none"),
    "best_of": _is_default(1),
    "suffix": _is_default(""),
    "audio": _is_default(),
    "modalities": _is_default(["text"]),
    "prediction": _is_default(),
    "web_search_options": _is_default(),
}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Text | None = None


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if v.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON Schema of type object, not {v['type']!r}")
        try:
            validator_for(v).check_schema(v)
        except SchemaError as e:
            raise ValueError(f"parameters is not a valid JSON Schema: {e.message}") from None
        return v

    def schema(self) -> dict[str, Any]:
        """The arguments' schema; none means a function without arguments (as OpenAI reads it)."""
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.parameters


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Text
    arguments: Text  # JSON text, as the assistant produced it


class ToolCallIn(BaseModel):
    """An assistant's earlier tool call, sent back in the history."""

    model_config = ConfigDict(extra="allow")
    id: Text
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages only
    tool_call_id: Text | None = None  # tool messages: the call this is the result of

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r}; expected one of {', '.join(ROLES)}")
        return v

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(
                f"tool_calls belong to assistant messages, not to a {self.role} message"
            )
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The message text; content parts other than text are rejected (this is a text model)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported (text only)")
            texts.append(part.text)
        return "".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema every choice's output is decoded under."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the grammar enforces the schema either way

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            validator_for(v).check_schema(v)
        except SchemaError as e:
            raise ValueError(f"schema is not a valid JSON Schema: {e.message}") from None
        return v


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object with its schema')
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint.json_object()
        if self.type == "json_schema" and self.json_schema is not None:
            return Constraint.json_schema(self.json_schema.schema_)
        return None


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions, with OpenAI's ranges."""

    model_config = ConfigDict(extra="allow")
    model: Text
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(v)}")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (digits), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    def penalties(self) -> dict[str, Any]:
        """The penalty and bias fields as SamplingParams takes them (defaults when left out)."""
        return {
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": self.repetition_penalty or 1.0,  # > 0 when given
            "logit_bias": {int(k): float(b) for k, b in (self.logit_bias or {}).items()},
        }

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = v if isinstance(v, list) else [] if v is None else [v]
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(
                f"a stop sequence may have at most {MAX_STOP_CHARS} characters, got {longest}"
            )
        return v

    def unsupported(self) -> str | None:
        """The first field that asks for something this server does not implement, if any."""
        extra = self.model_extra or {}
        for name, is_default in _UNSUPPORTED.items():
            if name in extra and not is_default(extra[name]):
                return name
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt list must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo=true is not supported by this server")
        return v

    def prompt_list(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
