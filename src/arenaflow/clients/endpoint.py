"""`EndpointClient`: any OpenAI-compatible chat endpoint (api.openai.com, vLLM, an arenaflow server).

The judge, the remote MT-bench competitors and the terminal chat all call endpoints through this
one class: the official `openai` client for the HTTP, and tenacity for the retry policy, which
needs more than the SDK's own retries offer (so those are off): every attempt first passes the
caller's budget gate (`CallGate`), `Retry-After` is honoured but capped at `backoff_max` (a server
asking for a day, or for ever, waits the cap), 429 / 5xx / timeouts / bodies cut off in transit are
retried with jittered exponential backoff, and a request the server refused for good (another 4xx)
is not. What was sent is counted exactly (`attempts`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from arenaflow.clients.budget import NO_BUDGET, BudgetRefusedError, CallGate, call_token_bound

log = logging.getLogger(__name__)

T = TypeVar("T")
OnResult = Callable[[int, T], None]  # (index of the request, its result) as each one returns


class EndpointError(RuntimeError):
    """A failure the caller reports in its own words (the URL is in the message)."""


class EndpointUnreachableError(EndpointError):
    """The server could not be reached on any attempt."""


class EndpointAuthError(EndpointError):
    """The server rejected the API key (401)."""


class EndpointModelError(EndpointError):
    """The server does not know the model (404)."""


class UnreadableReplyError(RuntimeError):
    """A 200 whose body is not a chat completion (cut off mid-JSON, no choices): retried like a 5xx."""


class _Transient(Exception):
    """An attempt that failed in a way worth retrying; `error` is what the server did."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def retry_after(exc: Exception) -> float | None:
    """The server's `Retry-After` (or `retry-after-ms`) in seconds, when it sent one."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isnan(seconds):
            continue
        return max(0.0, seconds)  # inf stays inf: the wait is capped at backoff_max
    return None


def describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {str(exc)[:200]}"


class _RedactRequestLog(logging.Filter):
    """httpx logs every request's URL at INFO; a password in a base_url must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from arenaflow.redact import redact

        if record.args:
            record.args = tuple(  # type: ignore[assignment]
                a if isinstance(a, int | float) else redact(str(a)) for a in record.args
            )
        record.msg = redact(str(record.msg))
        return True


def _redact_http_logs() -> None:
    for name in ("httpx", "httpx2"):  # the openai client's HTTP library, by release
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactRequestLog) for f in logger.filters):
            logger.addFilter(_RedactRequestLog())


class EndpointClient:
    """Chat completions against one endpoint and model, with retries, budget gating and a pool."""

    def __init__(
        self,
        base_url: str | None,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        concurrency: int = 1,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from openai import OpenAI

        _redact_http_logs()
        self.url = base_url or "https://api.openai.com/v1"
        self.model = model
        self.retries, self.backoff_base, self.backoff_max = retries, backoff_base, backoff_max
        self.concurrency = max(1, concurrency)
        self._sleep = sleep
        self._client = OpenAI(
            api_key=api_key or "EMPTY", base_url=base_url, max_retries=0, timeout=timeout
        )
        self._pool: ThreadPoolExecutor | None = None

    # -- one call --------------------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        error = exc.error if isinstance(exc, _Transient) else exc
        honoured = retry_after(error) if error is not None else None
        if honoured is not None:  # the server's wait, never longer than backoff_max
            return min(honoured, self.backoff_max)
        cap = min(self.backoff_max, self.backoff_base * 2 ** (state.attempt_number - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        error = exc.error if isinstance(exc, _Transient) else exc
        log.info(
            "call to %s failed (%s); retry %d/%d in %.2fs",
            self.url,
            type(error).__name__,
            state.attempt_number,
            self.retries,
            state.next_action.sleep if state.next_action else 0.0,
        )

    def chat(self, gate: CallGate = NO_BUDGET, **kwargs: Any) -> tuple[Any, int]:
        """One chat completion (`messages`, `max_tokens`, sampling fields) with retries; returns
        (response, attempts) or raises: BudgetRefusedError, EndpointUnreachableError,
        EndpointAuthError, EndpointModelError, or the last error with `arenaflow_attempts` set."""
        bound = call_token_bound(kwargs["messages"], int(kwargs["max_tokens"]))
        sent = {"attempts": 0}

        def attempt() -> Any:
            refused = gate.reserve(bound)
            if refused is not None:
                raise BudgetRefusedError(refused, sent["attempts"])
            sent["attempts"] += 1
            return self._attempt(gate, bound, kwargs)

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            before_sleep=self._before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(attempt), sent["attempts"]
        except _Transient as t:  # out of attempts
            import openai

            if isinstance(t.error, openai.APIConnectionError):
                raise EndpointUnreachableError(
                    f"the server at {self.url} is unreachable ({t.error.__cause__ or t.error})"
                ) from t.error
            t.error.arenaflow_attempts = sent["attempts"]  # type: ignore[attr-defined]
            raise t.error from None
        except Exception as e:
            if not isinstance(e, BudgetRefusedError | EndpointError):
                e.arenaflow_attempts = sent["attempts"]  # type: ignore[attr-defined]
            raise

    def _attempt(self, gate: CallGate, bound: int, kwargs: dict[str, Any]) -> Any:
        """One request; its reservation is settled with the reply's usage, with nothing for an
        error status (not billed), and with the whole bound for a timeout or an unreadable body
        (the server may have billed them)."""
        import openai

        used = 0
        try:
            response = self._client.chat.completions.create(model=self.model, **kwargs)
            if not getattr(response, "choices", None):
                used = bound
                raise _Transient(UnreadableReplyError("the reply holds no choices"))
            usage = response.usage
            used = (
                (getattr(usage, "prompt_tokens", 0) or 0)
                + (getattr(usage, "completion_tokens", 0) or 0)
                if usage is not None
                else bound
            )
            return response
        except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
            used = bound  # a body cut off in transit, or not a chat completion
            raise _Transient(
                UnreadableReplyError(f"the reply is not a chat completion ({e})")
            ) from e
        except openai.APITimeoutError as e:
            used = bound
            raise _Transient(e) from e
        except openai.APIConnectionError as e:
            raise _Transient(e) from e
        except openai.AuthenticationError as e:
            raise EndpointAuthError(f"the server at {self.url} rejected the API key (401)") from e
        except openai.NotFoundError as e:
            raise EndpointModelError(
                f"the server at {self.url} does not know model {self.model!r} (404)"
            ) from e
        except openai.APIStatusError as e:
            if e.status_code == 429 or e.status_code >= 500:
                raise _Transient(e) from e
            raise
        finally:
            gate.settle(bound, used)

    # -- many calls, streams, models -------------------------------------------------------------
    def map(
        self, fn: Callable[..., T], args: list[tuple[Any, ...]], on_result: OnResult[T] | None
    ) -> list[T]:
        """Run `fn` over `args` `concurrency` at a time, handing each result to `on_result` as it
        returns (in this thread). An error in one call waits for the others, so no reply that was
        paid for is lost, then is raised."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency)
        futures = {self._pool.submit(fn, *a): i for i, a in enumerate(args)}
        out: list[Any] = [None] * len(args)
        error: BaseException | None = None
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001 - raised below, once every call has returned
                error = error or e
                continue
            out[futures[future]] = result
            if on_result is not None:
                on_result(futures[future], result)
        if error is not None:
            raise error
        return out

    def stream(self, messages: list[dict[str, str]], **kwargs: Any) -> Iterator[str]:
        """The reply's text as it streams (no retries: a broken stream cannot be resumed)."""
        response = self._client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            **kwargs,
        )
        with response:
            for chunk in response:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    def models(self) -> list[str]:
        """The ids the endpoint lists at /models."""
        return [m.id for m in self._client.models.list()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._client.close()
