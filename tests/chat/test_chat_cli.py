"""`python -m arenaflow.chat` under a pseudo-terminal: scripted sessions against the tiny model's
engine and against the project's own OpenAI-compatible server on a loopback port."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
from openai import OpenAI

from arenaflow.engine import Engine, SamplingParams
from tests.serve.conftest import free_port

SYSTEM = "Be brief."
MAX_TOKENS = 8
PROMPT = r"USER(?:\x1b\[[0-9;]*m)*: "  # a regex: rich styles the role name
KEY = "sk-chat-test-9f3c1e"


def chat_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in {"OPENAI_API_KEY", "MLFLOW_TRACKING_URI"}
    }
    env.update(
        ARENAFLOW_HOME=str(home),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TERM="dumb",  # no readline/bracketed-paste escapes around the prompt
    )
    env.update(extra)
    return env


def chat_args(home: Path, *flags: str) -> list[str]:
    return [
        "-m",
        "arenaflow.chat",
        "experiment=test",
        "tracking=none",
        f"paths.home={home}",
        "--temperature",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
        "--system",
        SYSTEM,
        *flags,
    ]


def spawn(home: Path, *flags: str, **env: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        chat_args(home, *flags),
        env=chat_env(home, **env),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    child.logfile_read = io.StringIO()  # the whole transcript, for what must never appear
    child.expect(PROMPT)  # the banner, then the first prompt: the model is loaded
    return child


def say(child: pexpect.spawn, text: str) -> str:
    """Send one user line; the streamed answer as printed (terminal CRLFs back to newlines)."""
    child.sendline(text)
    child.expect("ASSISTANT: ")
    child.expect("\r\n" + PROMPT)
    return child.before.replace("\r\n", "\n")


def leave(child: pexpect.spawn, how: str = "/exit") -> int:
    if how == "/exit":
        child.sendline("/exit")
    elif how == "eof":
        child.sendeof()
    else:
        child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def greedy(engine: Engine, messages: list[dict[str, str]]) -> str:
    return engine.chat([messages], SamplingParams(max_new_tokens=MAX_TOKENS))[0].choices[0].text


def test_two_turn_session_is_the_engines_greedy_chat(
    short_context_model: Path, serve_engine: Engine, tmp_path: Path
) -> None:
    """Two turns, an empty line, a prompt that overflows the 96-token window, /clear, /exit."""
    system = [{"role": "system", "content": SYSTEM}]
    u1, u2 = "Tell me a joke", "Another one"
    a1 = greedy(serve_engine, [*system, {"role": "user", "content": u1}])
    first_exchange = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}]
    a2 = greedy(serve_engine, [*system, *first_exchange, {"role": "user", "content": u2}])
    a2_fresh = greedy(serve_engine, [*system, {"role": "user", "content": u2}])
    assert a1.strip() and a2.strip()
    assert a2 != a2_fresh, "the second turn must depend on the first for this test to mean anything"

    child = spawn(tmp_path, "--model-path", str(short_context_model))
    assert say(child, u1) == a1
    assert say(child, u2) == a2  # the prompt held the first exchange
    child.sendline("")  # ignored: straight back to the prompt
    child.expect(PROMPT)
    assert "ASSISTANT" not in child.before

    child.sendline(" ".join(["word"] * 120))
    child.expect(
        r"error: prompt too long: the conversation is (\d+) tokens and this model's "
        r"context window is 96"
    )
    assert int(child.match.group(1)) > 96
    child.expect(PROMPT)
    assert "ASSISTANT" not in child.before

    child.sendline("/clear")
    child.expect(r"conversation cleared.*\r\n" + PROMPT)
    assert say(child, u2) == a2_fresh  # a new conversation: only the system prompt remains
    assert leave(child) == 0


def test_endpoint_chat_streams_the_servers_answers(start_server, tmp_path: Path) -> None:
    with start_server(f"serve.api_keys=[{KEY}]") as srv:
        client = OpenAI(base_url=srv.v1, api_key=KEY)
        child = spawn(tmp_path, "--endpoint", srv.v1, "--api-key-env", "CHAT_KEY", CHAT_KEY=KEY)
        banner = child.before
        assert "tiny-chat" in banner  # the first model /v1/models lists
        messages = [{"role": "system", "content": SYSTEM}]
        for text in ("Tell me a joke", "Another one"):
            answer = say(child, text)
            messages.append({"role": "user", "content": text})
            full = client.chat.completions.create(
                model="tiny-chat", messages=messages, temperature=0, max_tokens=MAX_TOKENS
            )
            assert answer == full.choices[0].message.content
            messages.append({"role": "assistant", "content": answer})
        assert leave(child, "interrupt") == 0  # Ctrl-C at the prompt
        assert KEY not in child.logfile_read.getvalue()

        wrong = subprocess.run(
            [sys.executable, *chat_args(tmp_path, "--endpoint", srv.v1)],
            env=chat_env(tmp_path, OPENAI_API_KEY="sk-wrong-key-0000"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert wrong.returncode == 2
    assert "refused the API key" in wrong.stderr and "OPENAI_API_KEY" in wrong.stderr
    assert "sk-wrong-key-0000" not in wrong.stderr + wrong.stdout


def test_rich_style_renders_the_answer(start_server, tmp_path: Path) -> None:
    with start_server() as srv:
        expected = OpenAI(base_url=srv.v1, api_key="none").chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        words = expected.choices[0].message.content.split()
        assert words
        child = spawn(tmp_path, "--endpoint", srv.v1, "--style", "rich", TERM="xterm-256color")
        child.sendline("hi")
        child.expect("ASSISTANT")
        child.expect(PROMPT)
        shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)  # drop colours / cursor moves
        assert " ".join(words) in " ".join(shown.split())
        assert "\x1b[" in child.before  # styled by rich, not printed plain
        assert leave(child) == 0


def test_endpoint_that_goes_away_fails_the_turn_not_the_chat(start_server, tmp_path: Path) -> None:
    with start_server() as srv:
        child = spawn(tmp_path, "--endpoint", srv.v1)
        assert say(child, "hi").strip()
    child.sendline("are you there?")  # the server has stopped
    child.expect(r"error: cannot reach \S+/chat/completions")
    child.expect(PROMPT)
    assert leave(child, "eof") == 0  # Ctrl-D


def test_ctrl_c_during_an_answer_stops_only_that_answer(start_server, tmp_path: Path) -> None:
    with start_server() as srv:
        child = spawn(tmp_path, "--endpoint", srv.v1, "--max-tokens", "1500")
        child.sendline("hi")
        child.expect("ASSISTANT: ")
        child.sendintr()
        child.expect(r"answer interrupted; this turn is not kept\)\r\n" + PROMPT)
        assert leave(child) == 0


def test_start_up_errors_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    down = f"http://127.0.0.1:{free_port()}/v1"
    for flags, message in [
        (["--model-path", str(missing)], f"{missing} is not a checkpoint folder"),
        (["--endpoint", down], f"cannot reach {down}/models"),
    ]:
        done = subprocess.run(
            [sys.executable, *chat_args(tmp_path, *flags)],
            env=chat_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and message in lines[0], done.stderr


def test_help_explains_flags_and_overrides() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "arenaflow.chat", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for text in (
        "--endpoint",
        "--style {simple,rich}",
        "chat.model_uri",
        "Hydra overrides",
        "/clear",
    ):
        assert text in done.stdout
