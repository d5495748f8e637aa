"""OpenAI's response bodies as pydantic models, built from the engine's results and stream events.

chat.completion, chat.completion.chunk, text_completion (also its stream chunks) and the model
list; `Body` keeps the fields every body shares (id, created, model, fingerprint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from arenaflow.engine import GenerationResult, StreamEvent, TokenLogprob
from arenaflow.serve.tools import ToolPlan


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None

    @classmethod
    def of(cls, lps: list[TokenLogprob]) -> ChatLogprobs:
        return cls(
            content=[
                ChatTokenLogprob(
                    token=lp.token,
                    logprob=lp.logprob,
                    bytes=_bytes(lp.token),
                    top_logprobs=[
                        TopLogprob(token=t.token, logprob=t.logprob, bytes=_bytes(t.token))
                        for t in lp.top
                    ],
                )
                for lp in lps
            ]
        )


class TextLogprobs(BaseModel):
    """The legacy completions format: parallel lists and character offsets."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, lps: list[TokenLogprob]) -> TextLogprobs:
        offsets, pos = [], 0
        for lp in lps:
            offsets.append(pos)
            pos += len(lp.token)
        return cls(
            tokens=[lp.token for lp in lps],
            token_logprobs=[lp.logprob for lp in lps],
            top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in lps],
            text_offset=offsets,
        )


class CalledFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # {"role", "content"} first, then {"content"} or {"tool_calls"}, {} last
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")  # lineage, results, parent, ...
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "arenaflow"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


@dataclass
class Body:
    """The fields every body of one request shares; builds its bodies and stream chunks."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    include_usage: bool = False  # streams: every chunk carries "usage" (null until the last)

    def _common(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }

    def chat(self, result: GenerationResult, tools: ToolPlan | None = None) -> dict[str, Any]:
        """The answer; with tools, each choice's text split into content and tool calls."""
        choices = []
        for c in result.choices:
            message, finish = AssistantMessage(content=c.text), c.finish_reason
            if tools is not None:
                content, calls, finish = tools.split(c.text, c.finish_reason)
                message = AssistantMessage(
                    content=content, tool_calls=[ToolCall(**t.as_dict()) for t in calls] or None
                )
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=ChatLogprobs.of(c.logprobs) if c.logprobs is not None else None,
                    finish_reason=finish,
                )
            )
        usage = Usage.of(result.prompt_tokens, result.completion_tokens)
        return ChatCompletion(**self._common(), choices=choices, usage=usage).model_dump()

    def text(self, results: list[GenerationResult], n: int) -> dict[str, Any]:
        """All prompts' choices, indexed prompt-major (prompt i, choice j -> i * n + j)."""
        choices = [
            TextChoice(
                index=i * n + c.index,
                text=c.text,
                logprobs=TextLogprobs.of(c.logprobs) if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
            )
            for i, result in enumerate(results)
            for c in result.choices
        ]
        usage = Usage.of(
            sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        )
        return TextCompletion(**self._common(), choices=choices, usage=usage).model_dump()

    def chat_role_chunk(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk for one choice: the assistant role, no text yet."""
        choice = ChatChunkChoice(
            index=index,
            delta={"role": "assistant", "content": ""},
            logprobs=None,
            finish_reason=None,
        )
        return self._chunk(ChatCompletionChunk, [choice])

    def event_chunk(self, ev: StreamEvent, index: int, chat: bool) -> dict[str, Any]:
        """One stream event of choice `index` as a chunk."""
        lps = [ev.logprob] if ev.logprob is not None else None
        if chat:
            choice: BaseModel = ChatChunkChoice(
                index=index,
                delta={"content": ev.text} if ev.text else {},
                logprobs=ChatLogprobs.of(lps) if lps else None,
                finish_reason=ev.finish_reason,
            )
            return self._chunk(ChatCompletionChunk, [choice])
        choice = TextChoice(
            index=index,
            text=ev.text,
            logprobs=TextLogprobs.of(lps) if lps else None,
            finish_reason=ev.finish_reason,
        )
        return self._chunk(TextCompletion, [choice])

    def delta_chunks(
        self, ev: StreamEvent, deltas: list[dict[str, Any]], finish_reason: str | None
    ) -> list[dict[str, Any]]:
        """A chat event as chunks of the given deltas: logprobs on the first, the finish on the last."""
        lps = ChatLogprobs.of([ev.logprob]) if ev.logprob is not None else None
        if not deltas and (lps or finish_reason):
            deltas = [{}]
        choices = [
            ChatChunkChoice(
                index=ev.index,
                delta=delta,
                logprobs=lps if k == 0 else None,
                finish_reason=finish_reason if k == len(deltas) - 1 else None,
            )
            for k, delta in enumerate(deltas)
        ]
        return [self._chunk(ChatCompletionChunk, [choice]) for choice in choices]

    def usage_chunk(self, chat: bool, prompt: int, completion: int) -> dict[str, Any]:
        """The last chunk of a stream with include_usage: no choices, the request's usage."""
        return self._chunk(
            ChatCompletionChunk if chat else TextCompletion, [], Usage.of(prompt, completion)
        )

    def _chunk(
        self, kind: type[BaseModel], choices: list[Any], usage: Usage | None = None
    ) -> dict[str, Any]:
        body = kind(**self._common(), choices=choices, usage=usage).model_dump()
        if not self.include_usage:
            body.pop("usage")
        return body


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))
