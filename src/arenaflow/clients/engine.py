"""`EngineClient`: the arenaflow engine in process, behind the same small job as `EndpointClient`.

MT-bench answers, the terminal chat and the local judge render chats with the checkpoint's own
template and generate on one loaded `Engine`; a chat that cannot be generated (longer than the
context, a template that refuses its roles) is that chat's error, never one that loses a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from arenaflow.engine import Engine, SamplingParams
from arenaflow.engine.backends import EngineSpec, load_engine


@dataclass
class Reply:
    """One chat's answer: `text` is None and `error` says why when it could not be generated."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class EngineClient:
    """Chats on an engine that is loaded on first use (`ref`: a checkpoint folder or registry URI)
    on the backend `spec` names (`EngineSpec.from_cfg`: engine.backend, hardware)."""

    def __init__(
        self,
        ref: str | Path | Engine,
        *,
        tracking_uri: str | None = None,
        spec: EngineSpec | None = None,
        batch_size: int = 8,
    ) -> None:
        self._engine = ref if isinstance(ref, Engine) else None
        self.ref = str(ref) if not isinstance(ref, Engine) else ref.model_id
        self.tracking_uri = tracking_uri
        self.spec = spec or EngineSpec()  # the backend (engine.backend), device and dtype
        self.batch_size = batch_size

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(
                self.ref,
                self.spec,
                tracking_uri=self.tracking_uri,
                max_batch_size=self.batch_size,
            )
        return self._engine

    def chat_batch(
        self,
        chats: list[list[dict[str, str]]],
        params: list[SamplingParams],
        progress: Callable[[int], None] | None = None,
    ) -> list[Reply]:
        """Every chat's reply, `batch_size` rows decoding together (continuous batching)."""
        engine = self.engine
        out: list[Reply | None] = [None] * len(chats)
        requests, slots = [], []
        for i, (chat, p) in enumerate(zip(chats, params, strict=True)):
            try:
                requests.append(engine.make_request(engine.render_chat(chat), p))
                slots.append(i)
            except ValueError as e:  # PromptTooLongError, a template that refuses the chat
                out[i] = Reply(None, error=f"{type(e).__name__}: {e}")
        step = max(1, self.batch_size * 2)
        for start in range(0, len(requests), step):
            chunk = requests[start : start + step]
            engine.run_requests(chunk)
            for j, r in enumerate(chunk):
                if r.error is not None:
                    out[slots[start + j]] = Reply(None, error=str(r.error))
                    continue
                res = r.build_result()
                out[slots[start + j]] = Reply(
                    res.choices[0].text, res.prompt_tokens, res.completion_tokens
                )
            if progress:
                progress(len(chunk))
        return [o if o is not None else Reply(None, error="not generated") for o in out]

    def stream(
        self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int
    ) -> Iterator[str]:
        """The reply's text as it is decoded, capped by the room the context leaves; raises
        ValueError (with the fix) when the chat cannot be rendered or does not fit."""
        engine = self.engine
        try:
            prompt = engine.render_chat(messages)
        except Exception as e:  # a template that rejects the roles (e.g. no system turn allowed)
            raise ValueError(
                f"the model's chat template cannot render this conversation: {e}"
            ) from e
        used = len(engine.encode(prompt))
        room = engine.context_length - used
        if room < 1:
            raise ValueError(
                f"prompt too long: the conversation is {used} tokens and this model's context "
                f"window is {engine.context_length}; send a shorter message or /clear"
            )
        params = SamplingParams(max_new_tokens=min(max_tokens, room), temperature=temperature)
        for event in engine.stream(prompt, params):
            if event.text:
                yield event.text
