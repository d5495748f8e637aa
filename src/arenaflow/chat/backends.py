"""Who answers in a terminal chat: the project's engine on a local model, or an OpenAI-compatible
endpoint, each a thin adapter over the shared clients (`arenaflow.clients`).

Both stream the assistant's text for a whole conversation (list of role/content messages), so the
session loop and the renderers do not care where the tokens come from. A problem the user can fix
(the conversation no longer fits, the server is down, the key is refused) is a `ChatError` with a
one-line message; the session reports it and goes on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator
from typing import Any, Protocol

from omegaconf import DictConfig

from arenaflow.clients.endpoint import EndpointClient
from arenaflow.clients.engine import EngineClient
from arenaflow.engine.backends import EngineSpec

log = logging.getLogger(__name__)

Message = dict[str, str]


class ChatError(RuntimeError):
    """A turn (or the start-up) failed for a reason the user can act on; the message says how."""


class ChatBackend(Protocol):
    """Streams an answer to a conversation; `name` and `where` describe it in the banner."""

    name: str
    where: str

    def stream(
        self, messages: list[Message], *, temperature: float, max_tokens: int
    ) -> Generator[str, None, None]: ...


class LocalChat:
    """The project's engine on a checkpoint (`EngineClient`): the prompt is the model's own chat template."""

    def __init__(self, client: EngineClient, *, name: str, where: str) -> None:
        self.client = client
        self.name = name
        self.where = where

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> LocalChat:
        """`chat.model_uri` resolved as the server resolves `serve.model_uri` (same cache, dtype)."""
        from transformers.utils import logging as hf_logging

        from arenaflow.models import local_checkpoint, resolve_reference

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in the chat
        uri = str(cfg.chat.model_uri)
        try:
            path, _ = local_checkpoint(resolve_reference(uri, cfg), cfg, "chat.model_uri")
        except ValueError as e:
            raise ChatError(str(e)) from e
        client = EngineClient(
            path,
            spec=EngineSpec.from_cfg(cfg),
            tracking_uri=cfg.tracking.tracking_uri if cfg.tracking.enabled else None,
        )
        _ = client.engine  # load now: the banner comes after the model is ready
        return cls(client, name=uri, where=str(path))

    def stream(
        self, messages: list[Message], *, temperature: float, max_tokens: int
    ) -> Generator[str, None, None]:
        try:
            yield from self.client.stream(messages, temperature=temperature, max_tokens=max_tokens)
        except ValueError as e:  # the conversation cannot be rendered or no longer fits
            raise ChatError(str(e)) from e


class EndpointChat:
    """Any OpenAI-compatible server (an arenaflow endpoint, vLLM, api.openai.com) via the `openai` client."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
    ) -> None:
        self.where = base_url
        self.name = model or ""
        self.api_key_env = api_key_env
        api_key = os.environ.get(api_key_env) if api_key_env else None
        # no retries: a person is waiting, and a failed turn is reported and can be sent again
        self._client = EndpointClient(
            base_url, self.name, api_key=api_key, timeout=timeout_s, retries=0
        )

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> EndpointChat:
        c = cfg.chat
        backend = cls(
            str(c.endpoint),
            model=None if c.model is None else str(c.model),
            api_key_env=None if c.api_key_env is None else str(c.api_key_env),
            timeout_s=float(c.timeout_s),
        )
        backend.check()
        return backend

    def check(self) -> list[str]:
        """Ask the endpoint which models it serves; pick the first when none was named."""
        try:
            models = self._client.models()
        except Exception as e:
            raise ChatError(self._explain(e, "/models")) from e
        if not self.name:
            if not models:
                raise ChatError(f"{self.where} lists no models; name one with --model")
            self.name = models[0]
            self._client.model = self.name
        elif models and self.name not in models:
            log.warning("%s does not list %r (it lists %s)", self.where, self.name, models)
        _build_chunk_models()
        return models

    def stream(
        self, messages: list[Message], *, temperature: float, max_tokens: int
    ) -> Generator[str, None, None]:
        try:
            yield from self._client.stream(messages, temperature=temperature, max_tokens=max_tokens)
        except Exception as e:
            raise ChatError(self._explain(e, "/chat/completions")) from e

    def _explain(self, error: Exception, path: str) -> str:
        """One line naming the endpoint, what went wrong and what to do (never the key)."""
        import httpx
        import openai

        url = self.where.rstrip("/") + path
        if isinstance(error, openai.APITimeoutError):
            return f"{url} did not answer in time; is the server overloaded? (chat.timeout_s)"
        if isinstance(error, openai.APIConnectionError):
            return f"cannot reach {url}: is the server running and the URL right? ({error.__cause__ or error})"
        if isinstance(error, openai.AuthenticationError):
            env = self.api_key_env or "--api-key-env"
            return f"{url} refused the API key; put the right key in the environment variable {env}"
        if isinstance(error, openai.APIStatusError):
            body: Any = error.body
            detail = body.get("message") if isinstance(body, dict) else None
            return f"{url} answered {error.status_code}: {detail or error.message}"
        if isinstance(error, openai.APIError):
            return f"{url} failed: {error.message}"
        if isinstance(error, httpx.HTTPError):  # the connection broke mid-stream
            return f"the connection to {url} broke: {error}"
        raise error


def _build_chunk_models() -> None:
    """Build the openai client's streamed-chunk models before the first prompt: pydantic builds
    them on first use, and a Ctrl-C landing inside that build comes out as pydantic's
    SchemaError instead of KeyboardInterrupt, which would end the chat instead of the answer."""
    import pydantic
    from openai.types.chat import chat_completion_chunk

    for model in vars(chat_completion_chunk).values():  # the chunk, its choices, deltas, usage
        if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
            model.model_rebuild()  # builds only what is not built yet


def backend_from_cfg(cfg: DictConfig) -> ChatBackend:
    """An endpoint when `chat.endpoint` is set, else the local model `chat.model_uri`."""
    if cfg.chat.get("endpoint"):
        return EndpointChat.from_cfg(cfg)
    return LocalChat.from_cfg(cfg)
