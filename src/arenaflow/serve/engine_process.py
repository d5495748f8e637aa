"""An engine process the app runs as its child: spawned, waited for until it serves, stopped.

A `serve.models` entry with `engine: vllm` is served by `vllm serve <checkpoint>` (vLLM's own
OpenAI server) on a free loopback port, behind the gateway (serve/upstream.py). Adapter entries
over one base share one `vllm serve <base>` with each adapter as a LoRA module under its served
name (`--enable-lora --lora-modules name=folder`), so they share the base's weights and batches. The child gets the
environment a deployed server gets (`process.child_env`: no secret-looking variable) plus a key
made for it alone (`VLLM_API_KEY`, never on its command line, where `ps` shows it to every local
user), so only the gateway, with its own keys, metrics and limits, reaches the engine.

The child stays in the app's process group, so a deployment that stops the app's group
(`process.stop_server`) or a Ctrl-C in the terminal stops the engine too; the app stops it itself
when its lifespan ends (its own descendants first sent SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from omegaconf import DictConfig, OmegaConf

from arenaflow.serve.errors import ServeConfigError
from arenaflow.serve.process import _SECRET_NAME, alive, child_env, free_port, listens

log = logging.getLogger(__name__)

VLLM_KEY_ENV = "VLLM_API_KEY"  # vLLM's server requires this bearer key when it is set


class EngineProcessError(ServeConfigError):
    """The engine process exited or was not serving in time (its log's tail is in the message)."""


@dataclass
class EngineProcess:
    """A running engine child: its OpenAI base URL (`url`, ends in /v1) and its key."""

    name: str
    proc: subprocess.Popen
    url: str
    api_key: str
    log_path: Path

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the engine and what it started (vLLM's engine-core workers), SIGKILL after
        `timeout_s`."""
        if self.proc.poll() is not None:
            return
        try:
            tree = [psutil.Process(self.proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in tree:
            _signal(p, "terminate")
        _, left = psutil.wait_procs(tree, timeout=timeout_s)
        for p in left:
            _signal(p, "kill")
        psutil.wait_procs(left, timeout=5)
        self.proc.poll()  # reaped: no zombie is left behind
        log.info("stopped the engine process of %s (pid %d)", self.name, self.proc.pid)


def _signal(p: psutil.Process, how: str) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        getattr(p, how)()


def engine_env(key_env: str, key: str, prefixes: Sequence[str] = ()) -> dict[str, str]:
    """What a deployed server gets (`child_env`), the engine's own settings (`prefixes`, e.g.
    VLLM_) without secret-looking names, and its key under `key_env`."""
    env = child_env([])
    env.update(
        {
            k: v
            for k, v in os.environ.items()
            if prefixes and k.startswith(tuple(prefixes)) and not _SECRET_NAME.search(k)
        }
    )
    env[key_env] = key
    return env


def start_engine(
    name: str,
    argv: list[str],
    env: dict[str, str],
    *,
    url: str,
    api_key: str,
    log_path: Path,
    ready_timeout_s: float,
) -> EngineProcess:
    """Spawn `argv` and return once `url`/models answers 200 from it; an engine that exits or is not
    serving in time is stopped and raises EngineProcessError with its log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    engine = EngineProcess(name, proc, url, api_key, log_path)
    log.info(
        "started the engine process of %s (pid %d) on %s; log: %s", name, proc.pid, url, log_path
    )
    try:
        wait_serving(engine, ready_timeout_s)
    except BaseException:
        engine.stop()
        raise
    return engine


def wait_serving(engine: EngineProcess, timeout_s: float) -> None:
    port = httpx.URL(engine.url).port
    deadline = time.time() + timeout_s
    headers = {"Authorization": f"Bearer {engine.api_key}"}
    while True:
        if engine.proc.poll() is not None or not alive(engine.proc.pid):
            raise EngineProcessError(
                f"the engine process of {engine.name} exited with code {engine.proc.returncode} "
                f"before it served; its log ({engine.log_path}) ends with:\n{_tail(engine.log_path)}"
            )
        try:
            resp = httpx.get(f"{engine.url}/models", headers=headers, timeout=2)
            if resp.status_code == 200 and (port is None or listens(engine.proc.pid, port)):
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise EngineProcessError(
                f"the engine process of {engine.name} was not serving after {timeout_s:g} s "
                f"(serve.engine_process.ready_timeout_s); its log: {engine.log_path}"
            )
        time.sleep(0.25)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def vllm_binary() -> str | None:
    """The `vllm` command of this environment (its venv first), or None when vLLM is not installed."""
    local = Path(sys.executable).with_name("vllm")
    return str(local) if local.is_file() else shutil.which("vllm")


def vllm_command(
    binary: str,
    checkpoint: Path,
    names: str | Sequence[str],
    *,
    host: str,
    port: int,
    dtype: str,
    max_num_seqs: int,
    loras: Mapping[str, Path] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """`vllm serve` for one checkpoint under its served name(s) (the key goes in the environment),
    with `loras` (served name -> adapter folder) as LoRA modules over it.

    `--generation-config vllm`: a request that leaves a field out gets the OpenAI default, as from
    the in-process engine, not the checkpoint's generation_config.json (vLLM's own default)."""
    from arenaflow.engine.vllm import lora_options

    argv = [
        binary, "serve", str(checkpoint),
        "--served-model-name", *([names] if isinstance(names, str) else names),
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--max-num-seqs", str(max_num_seqs),
        "--generation-config", "vllm",
    ]  # fmt: skip
    if loras:
        options = lora_options(loras)
        argv += ["--enable-lora", "--max-loras", str(options["max_loras"])]
        argv += ["--max-lora-rank", str(options["max_lora_rank"]), "--lora-modules"]
        argv += [f"{name}={path}" for name, path in loras.items()]
    return [*argv, *extra_args]


def require_vllm(name: str, where: str) -> str:
    """The `vllm` command, or ServeConfigError saying how to get it."""
    binary = vllm_binary()
    if binary is None:
        raise ServeConfigError(
            f"{where} ({name}) has engine: vllm, but vLLM is not installed here; install it on "
            "the GPU machine (`pip install vllm`) or leave `engine` out to serve in process"
        )
    return binary


def launch_vllm(
    cfg: DictConfig,
    name: str | Sequence[str],
    checkpoint: Path,
    where: str,
    loras: Mapping[str, Path] | None = None,
) -> EngineProcess:
    """`vllm serve` for one checkpoint (under one or more served names, with `loras` over it) as
    this app's child (ServeConfigError without vLLM or for an adapter vLLM cannot apply)."""
    names = [name] if isinstance(name, str) else list(name)
    name = names[0]
    binary = require_vllm(name, where)
    ep = cfg.serve.engine_process
    host = str(ep.host)
    port = free_port(host)
    try:
        argv = vllm_command(
            binary,
            checkpoint,
            names,
            host=host,
            port=port,
            dtype=str(cfg.hardware.dtype),
            max_num_seqs=int(cfg.serve.max_batch_size),
            loras=loras,
            extra_args=[str(a) for a in _list(ep.get("vllm_args"))],
        )
    except ValueError as e:
        raise ServeConfigError(f"{where} ({', '.join([*names, *(loras or {})])}): {e}") from e
    key = secrets.token_urlsafe(32)
    log_path = Path(cfg.paths.home) / "serve" / "engines" / f"{name}-{port}.log"
    return start_engine(
        name,
        argv,
        engine_env(VLLM_KEY_ENV, key, prefixes=("VLLM_",)),
        url=f"http://{host}:{port}/v1",
        api_key=key,
        log_path=log_path,
        ready_timeout_s=float(ep.ready_timeout_s),
    )


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
