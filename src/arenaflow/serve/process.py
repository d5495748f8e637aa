"""The server processes a deployment starts: recorded from the moment they exist, stopped only when
they are provably ours, and started with a redacted config file and no more environment than they
need (`child_config`).

Each process gets a record (`<run dir>/process.json`) written right after `Popen`, before the
deployment waits for it, so a Dagster run killed at any later moment leaves a stray that the next
deployment finds (`stop_strays`). Before any signal the process must still be the recorded one:
the same pid, the same start time and the record's config file on its command line, so a reused
pid is never killed. `deploy_lock` makes deployments of one `paths.home` take turns, which is what
lets a record that is not the current deployment be called a stray.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from arenaflow.redact import redact

log = logging.getLogger(__name__)

KEYS_ENV = (
    "ARENAFLOW_DEPLOY_API_KEYS"  # the deployed server's bearer keys (its config names this var)
)
SECRETS_ENV = "ARENAFLOW_DEPLOY_SECRETS"  # JSON {dotted config path: value} redacted from its file
RECORD = "process.json"

# What a server needs from its parent's environment: the interpreter, locale, offline / cache
# switches of Hugging Face, thread and device settings, and MLflow's own variables (the server
# reads its card from the registry, with the credentials MLflow takes from the environment).
_ENV_NAMES = {
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "TZ", "LANG", "LANGUAGE",
    "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "TOKENIZERS_PARALLELISM",
}  # fmt: skip
_ENV_PREFIXES = (
    "LC_", "PYTHON", "HF_", "TRANSFORMERS_", "MLFLOW_", "CUDA_", "NVIDIA_", "OMP_", "MKL_",
    "TORCH", "PYTORCH_",
)  # fmt: skip
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL", re.IGNORECASE)


@dataclass
class Deployment:
    """One server process, as recorded in the state file and in its run dir's `process.json`."""

    url: str  # OpenAI base URL, http://host:port/v1
    pid: int
    port: int
    model_uri: str
    version: str | None
    started_at: float
    config_path: str
    log_path: str
    create_time: float | None = None  # the process's start time (psutil), against pid reuse

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")

    @property
    def record_path(self) -> Path:
        return Path(self.config_path).with_name(RECORD)


def load_record(path: Path) -> Deployment | None:
    try:
        return Deployment(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, TypeError) as e:
        log.warning("deployment record %s is unreadable (%s); ignoring it", path, e)
        return None


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a record


def child_env(keys: list[str], parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: what `_ENV_NAMES`/`_ENV_PREFIXES` allow, minus secret-looking names
    (HF_TOKEN, ...) other than MLflow's, plus the bearer keys under `KEYS_ENV`."""
    parent = os.environ if parent is None else parent
    env = {
        k: v
        for k, v in parent.items()
        if (k in _ENV_NAMES or k.startswith(_ENV_PREFIXES))
        and (k.startswith("MLFLOW_") or not _SECRET_NAME.search(k))
    }
    if keys:
        env[KEYS_ENV] = ",".join(keys)
    return env


def child_config(
    container: dict[str, Any], keys: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A server's config file (redacted) and environment (the secrets it needs) from its resolved config.

    The keys reach it under `KEYS_ENV`, which its config names as `serve.api_keys_env`, so a key
    configured anywhere (`serve.api_keys` or the parent's `$<serve.api_keys_env>`) is enforced.
    Variables other `serve.*_env` keys name (`serve.arena.client_secret_env`) are passed on.
    Other `serve.*`/`tracking.*` values that redaction hides (a password in the arena's database
    URL or the tracking URI) travel as JSON in `SECRETS_ENV` and `launch` puts them back.
    """
    container["serve"].update({"api_keys": [], "api_keys_env": KEYS_ENV})
    safe = redact(container)
    env = child_env(keys)
    for name in _env_names(container["serve"]):  # variables the server itself reads
        if name in os.environ:
            env[name] = os.environ[name]
    hidden = {
        path: value
        for section in ("serve", "tracking")
        for path, value in _redacted_leaves(container[section], safe[section], section).items()
    }
    if hidden:
        env[SECRETS_ENV] = json.dumps(hidden)
    return safe, env


def _env_names(section: dict[str, Any]) -> list[str]:
    names = []
    for k, v in section.items():
        if isinstance(v, dict):
            names += _env_names(v)
        elif isinstance(v, list):  # serve.models[i].upstream.api_key_env
            names += [n for item in v if isinstance(item, dict) for n in _env_names(item)]
        elif str(k).endswith("_env") and v and k != "api_keys_env":
            names.append(str(v))
    return names


def _redacted_leaves(real: Any, safe: Any, path: str) -> dict[str, Any]:
    """Dotted paths (and real values) of what redaction changed; a changed list counts whole."""
    if isinstance(real, dict) and isinstance(safe, dict):
        out: dict[str, Any] = {}
        for k, v in real.items():
            out.update(_redacted_leaves(v, safe.get(k), f"{path}.{k}"))
        return out
    return {} if real == safe else {path: real}


def listens(pid: int, port: int) -> bool:
    """The answer on `port` is this server's (not a process that took the port in the race)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def free_port(host: str) -> int:
    """A port free now; another process may take it before the server binds (the caller retries)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(
    config_path: Path, log_path: Path, env: dict[str, str], *, host: str, port: int, model_uri: str
) -> tuple[subprocess.Popen, Deployment]:
    """Start `python -m arenaflow.serve.launch <config>` detached and record it before returning."""
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "arenaflow.serve.launch", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # detached: outlives the Dagster run that started it
        )
    dep = Deployment(
        url=f"http://{host}:{port}/v1",
        pid=proc.pid,
        port=port,
        model_uri=model_uri,
        version=None,
        started_at=time.time(),
        config_path=str(config_path),
        log_path=str(log_path),
        create_time=_create_time(proc.pid),
    )
    write_json(dep.record_path, asdict(dep))
    return proc, dep


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_ours(dep: Deployment) -> bool:
    """The recorded process itself, not a later one that reuses its pid."""
    try:
        proc = psutil.Process(dep.pid)
        if dep.create_time is not None and abs(proc.create_time() - dep.create_time) > 0.05:
            return False
        return dep.config_path in proc.cmdline()
    except psutil.Error:  # gone, a zombie, or another user's process
        return False


def stop_server(dep: Deployment, timeout_s: float = 20.0) -> None:
    """SIGTERM the server's process group (uvicorn drains), SIGKILL after `timeout_s`."""
    if not alive(dep.pid) or not is_ours(dep):
        dep.record_path.unlink(missing_ok=True)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(dep.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not alive(dep.pid):
                log.info("stopped server pid %d (%s)", dep.pid, dep.url)
                dep.record_path.unlink(missing_ok=True)
                return
            time.sleep(0.1)
    if alive(dep.pid):
        log.warning("server pid %d did not stop", dep.pid)
    else:
        dep.record_path.unlink(missing_ok=True)


def stop_strays(runs_dir: Path, keep: Deployment | None, timeout_s: float) -> list[Deployment]:
    """Stop every recorded server under `runs_dir` but `keep` (left by runs killed mid-deployment).

    Call it holding `deploy_lock`: then no other deployment is starting a server right now.
    """
    stopped = []
    for path in sorted(runs_dir.glob(f"*/{RECORD}")):
        dep = load_record(path)
        if dep is None or (keep is not None and dep.config_path == keep.config_path):
            continue
        if alive(dep.pid) and is_ours(dep):
            log.warning(
                "stopping stray server pid %d (%s, %s) left by an interrupted deployment",
                dep.pid,
                dep.url,
                dep.model_uri,
            )
            stop_server(dep, timeout_s)
            stopped.append(dep)
        else:
            path.unlink(missing_ok=True)  # gone (or its pid now belongs to another process)
    return stopped


@contextlib.contextmanager
def deploy_lock(serve_dir: Path) -> Iterator[None]:
    """One deployment at a time per `paths.home` (the OS drops the lock when its holder dies)."""
    serve_dir.mkdir(parents=True, exist_ok=True)
    with (serve_dir / "deploy.lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another deployment of %s is in progress; waiting for it", serve_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
