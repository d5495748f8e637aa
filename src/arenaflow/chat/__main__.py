"""`python -m arenaflow.chat [flags] [hydra overrides]`: chat with a model in the terminal.

The `chat` config group (conf/chat/default.yaml) holds the defaults; Hydra overrides such as
`chat.temperature=0` or `experiment=test` compose the config as for every other stage, and the
flags are shorthands for `chat.*` keys that win over the overrides.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

EPILOG = """\
configuration:
  Every flag is a shorthand for a key of the `chat` config group (conf/chat/default.yaml) and wins
  over the same key given as a Hydra override. Positional arguments are Hydra overrides, composed
  with conf/config.yaml as for the other stages:
    --model-path -> chat.model_uri   (default: serve.model_uri, the registry's champion)
    --endpoint -> chat.endpoint      --model -> chat.model       --api-key-env -> chat.api_key_env
    --style -> chat.style            --temperature -> chat.temperature
    --max-tokens -> chat.max_tokens  --system -> chat.system

in the chat:
  /clear starts a new conversation (the system prompt stays); /exit, Ctrl-D or Ctrl-C at the prompt
  leave with exit status 0; Ctrl-C during an answer stops that answer; an empty line is ignored.

errors:
  A model that cannot be loaded or an endpoint whose /v1/models does not answer stops the start-up
  with one line on stderr and exit status 2. Once chatting, a failed turn (prompt longer than the
  context window, endpoint gone, server error) is reported on one line, left out of the history,
  and the chat goes on.

examples:
  python -m arenaflow.chat --model-path models:/arenaflow-chat@champion
  python -m arenaflow.chat --model-path /path/to/checkpoint --style rich --temperature 0
  python -m arenaflow.chat --endpoint http://127.0.0.1:8000/v1 --model arenaflow-chat
  python -m arenaflow.chat hardware=gpu_1x chat.model_uri=runs:/<run id>/model chat.max_tokens=1024
"""

# flag dest -> chat.<key>
FLAG_KEYS = {
    "model_path": "model_uri",
    "endpoint": "endpoint",
    "model": "model",
    "api_key_env": "api_key_env",
    "style": "style",
    "temperature": "temperature",
    "max_tokens": "max_tokens",
    "system": "system",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m arenaflow.chat",
        description="Multi-turn chat in the terminal with a local model (the project's engine) "
        "or any OpenAI-compatible endpoint, streamed token by token.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides, e.g. chat.temperature=0 hardware=gpu_1x experiment=test",
    )
    p.add_argument(
        "--model-path",
        metavar="PATH_OR_URI",
        help="checkpoint folder, models:/name@alias, models:/name/3 or runs:/<run id>/<path>",
    )
    p.add_argument(
        "--endpoint", metavar="URL", help="OpenAI-compatible base URL, e.g. http://host:8000/v1"
    )
    p.add_argument(
        "--model", metavar="NAME", help="the endpoint's model (default: the first it lists)"
    )
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)",
    )
    p.add_argument("--style", choices=["simple", "rich"], help="plain text or rendered markdown")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--max-tokens", type=int, metavar="N", help="most tokens per answer")
    p.add_argument("--system", metavar="TEXT", help="system prompt for every conversation")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    # Ctrl-C is part of the interface (stop an answer, leave at the prompt): Python leaves SIGINT
    # ignored when it started ignored (a shell's background job, nohup), so claim it explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from arenaflow.config import compose_config

    try:
        cfg = compose_config(args.overrides)
    except Exception as e:  # Hydra names the bad override
        print(f"error: cannot compose the config: {e}", file=sys.stderr)
        return 2
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is not None:
            cfg.chat[key] = value

    from arenaflow.chat.backends import ChatError
    from arenaflow.chat.session import open_session

    try:
        session = open_session(cfg)
    except (ChatError, ValueError, OSError) as e:  # bad model or style, endpoint down, bad key
        print(f"error: {e}", file=sys.stderr)
        return 2
    session.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
